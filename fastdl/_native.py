"""Loads the native extension fastdl._C if it was built; fastdl works without it."""
import torch  # noqa: F401  (torch's libraries must be loaded before fastdl._C)

try:
    from fastdl import _C  # noqa: F401  (registers torch.ops.fastdl.*)

    LOADED = True
    LOAD_ERROR = None
except ImportError as exc:  # not built (FASTDL_NO_NATIVE=1, or a source checkout)
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
