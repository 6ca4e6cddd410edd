"""Loads the native extension fastdl._C if it was built; fastdl works without it."""
import torch  # noqa: F401  (torch's libraries must be loaded before fastdl._C)

# The ops this Python code calls by name (the kernels' per-device implementations are
# looked up by has_kernel). A fastdl._C built from older sources lacks some: the native
# backends are then unavailable, with LOAD_ERROR saying why, instead of a failing import.
REQUIRED_OPS = ("softmax_rows_forward", "softmax_rows_backward", "softmax_eager", "layer_norm_rows_forward",
                "layer_norm_rows_backward", "layer_norm_eager", "set_poison_outputs", "native_built_with_cuda")
# and the Python functions of fastdl._C itself (csrc/python.cpp)
REQUIRED_FUNCTIONS = (
    "softmax_eager", "layer_norm_eager", "softmax_checked", "softmax_backward_checked", "layer_norm_checked",
    "forget_resolutions",
)


def missing_ops(names=REQUIRED_OPS) -> list[str]:
    """The names among `names` that fastdl._C did not register as torch.ops.fastdl.<name>."""
    return [name for name in names if not hasattr(torch.ops.fastdl, name)]


try:
    from fastdl import _C  # noqa: F401  (registers torch.ops.fastdl.*)

    if missing := missing_ops() + [f"{name}()" for name in REQUIRED_FUNCTIONS if not hasattr(_C, name)]:
        raise ImportError(f"fastdl._C is older than fastdl's Python code (it has no {', '.join(missing)}); rebuild "
                          "it: pip install --no-build-isolation --no-deps -e .")
    LOADED = True
    LOAD_ERROR = None
except ImportError as exc:  # not built (FASTDL_NO_NATIVE=1, or a source checkout), or stale
    LOADED = False
    LOAD_ERROR = str(exc)


def has_kernel(op_name: str, device_type: str) -> bool:
    """True when fastdl._C registered `fastdl::<op_name>` for `device_type` ("cpu"/"cuda")."""
    if not LOADED:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdl::{op_name}", key)


def built_with_cuda() -> bool:
    return LOADED and bool(torch.ops.fastdl.native_built_with_cuda())


def bare_op(overload):
    """The callable behind a torch.ops OpOverload: calling it skips OpOverload.__call__'s
    Python frame (~0.3 us a call; that frame only passes the arguments on). The overload
    itself where a torch keeps no such attribute."""
    return getattr(overload, "_op", overload)


def eager_entry(name: str):
    """The eager entry `name` of the native backends (softmax_eager, layer_norm_eager) as
    fastdl._C's Python function of that name, which runs the op's C++ without torch.ops'
    boxed call and takes any argument it does not handle to torch.ops.fastdl.<name>
    (csrc/python.cpp); None without the native extension."""
    if not LOADED:
        return None
    return getattr(_C, name, None) or bare_op(getattr(torch.ops.fastdl, name).default)
