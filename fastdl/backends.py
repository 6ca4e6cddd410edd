"""Which backends exist on this machine, and which one runs each op on each device.

Backends:
  triton  Triton kernels (fastdl/triton): CUDA tensors; CPU tensors only under
          TRITON_INTERPRET=1 (how CI tests them without a GPU)
  cuda    CUDA C++ kernels (kernels/ + csrc/ops) in fastdl._C built with CUDA
  cpu     C++ CPU kernels (csrc/cpu) in fastdl._C
  torch   plain PyTorch; always there

The choice, in order of precedence: `with fastdl.use_backend(...)`, then
`fastdl.set_backend(...)`, then the FASTDL_BACKEND environment variable (read when fastdl
is imported), then "auto".
"auto" walks PREFERENCE for the op and device and takes the first backend that can
run the call (within SIZE_LIMITS); a named backend that cannot run it raises
BackendUnavailableError.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

from fastdl import _native

BACKENDS = ("triton", "cuda", "cpu", "torch")
# the backends whose kernels are in fastdl._C (their autograd too: csrc/autograd)
NATIVE = ("cuda", "cpu")

# op -> device type, or (device type, dtype) where a dtype's order differs -> backends to
# try in order, under "auto".
# Justify each entry with a committed benchmark run (benchmarks/results/<device>/):
# `python -m fastdl.bench.preference benchmarks/results/<device>` ranks the backends.
# cuda: benchmarks/results/h200, run at cc56307 (one H200; NOTES.md there). fastdl-cuda is
# the fastest fastdl backend in most cases of every entry and dtype timed (layer_norm bf16 9/10,
# rms_norm 4/4, softmax bf16 9/14, fp16 6/10, fp32 5/5) and in every host-timed one: an eager
# call on triton costs ~40-90 us more host time (softmax bf16 32x512: 49 vs 11 us a call). The
# triton kernels win only at the largest sizes (softmax fwd bf16 4096x16384: 88% vs 64% of copy).
# cpu: benchmarks/results/cpu, run at 96ab999 (fastdl-cpu vs torch eager, 2-core EPYC VM;
# the b39ef3d run there, the d450b1b, f998b28, c239258, 04ec140 and 88fb053 runs on a 2-core
# Xeon VM and the 2c43ffc run on an EPYC gave the same orders but for 16-bit softmax, which
# went to torch until the lane sums of ac5e65e).
PREFERENCE = {
    "softmax": {
        "cuda": ("cuda", "triton", "torch"),
        # fp32 4096x4096: fwd 2.47x, bwd 2.72x; 4096x1024: bf16 fwd 1.34x / bwd 0.98x, fp16
        # 1.43x / 1.36x. A training step (fwd + bwd through fastdl.ops, one warm process, same
        # VM, c239258's code): cpu 1.05-1.15x the torch backend at 4096x256 / 4096x1024 in bf16 and fp16
        # (bf16 log_softmax 4096x1024 level, 0.98x), 1.3-1.45x at 64x512
        "cpu": ("cpu", "torch"),
    },
    # layer_norm and the fused add + layer_norm.
    # fp32 4096x4096: 2.79x / 2.22x fwd / fwd+bwd; 4096x1024: bf16 1.37x-1.90x (re-timed at
    # 4aec82e, merged into that run), fp16 1.75x-2.07x (layer_norm, add_layer_norm). Were
    # fastdl-cpu to trail eager (bf16 layer_norm fwd did, 0.94x, at
    # 88fb053), the norms' "torch" backend would be no way out: it is plain tensor ops (it
    # must return mean and rstd), not eager's kernel, and ~4x slower still (4096x1024 fp16
    # fwd: 8.1 ms, fastdl-cpu 2.1 ms, eager 1.3 ms at 1a25ae6). So cpu is first for every dtype.
    "layer_norm": {
        "cuda": ("cuda", "triton", "torch"),
        "cpu": ("cpu", "torch"),
    },
    # rms_norm and the fused add + rms_norm (layer_norm's kernels, its own order)
    "rms_norm": {
        "cuda": ("cuda", "triton", "torch"),
        "cpu": ("cpu", "torch"),  # fp32 8.43x / 12.10x, bf16 8.28x / 13.19x, fp16 11.06x / 23.56x
    },
}


# (op, backend) -> the most rows, and the most columns, its kernels take, where that is less
# than any tensor's: "auto" passes over the backend for a call beyond it, to the next in
# PREFERENCE; a backend chosen by name runs the call, and its op says the tensor is too large.
# The CUDA softmax kernels take rows and columns in 32 bits (csrc/ops/softmax.cpp; the checked
# entries in csrc/python.cpp leave such calls to Python, which resolves them here).
SIZE_LIMITS = {("softmax", "cuda"): 2**31 - 1}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run this call here; the message says why."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({exc})"
    return None


@functools.lru_cache(maxsize=256)
def why_unavailable(backend: str, device_type: str, op: str | None = None) -> str | None:
    """None when `backend` can run on `device_type` here, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "triton":
        if (err := _triton_import_error()) is not None:
            return err
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device"
        if device_type == "cpu":
            return None if triton_interpreting() else "triton runs CPU tensors only under TRITON_INTERPRET=1"
        return f"triton does not run on {device_type} tensors"
    if backend in ("cpu", "cuda"):
        if not _native.LOADED:
            return f"the native extension fastdl._C is not built ({_native.LOAD_ERROR})"
        if backend != device_type:
            return f"the {backend} backend runs {backend} tensors, not {device_type} tensors"
        if backend == "cuda" and not _native.built_with_cuda():
            return "fastdl._C was built without CUDA (rebuild with a CUDA torch and nvcc, FASTDL_BUILD_CUDA=1)"
        if backend == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        if op is not None and not _native.has_kernel(f"{_NATIVE_KERNEL.get(op, op)}_rows_forward", device_type):
            return f"fastdl._C has no {backend} kernel for {op}"
        return None
    raise ValueError(f"fastdl: unknown backend {backend!r}; expected one of {BACKENDS + ('auto',)}")


def available_backends(device_type: str | None = None) -> list[str]:
    """Backends that can run here, for `device_type` ("cpu"/"cuda") or for any device."""
    devices = (device_type,) if device_type else ("cuda", "cpu")
    return [b for b in BACKENDS if any(why_unavailable(b, d) is None for d in devices)]


def _check_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"fastdl: unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    return name


_global_choice: str | None = None
# FASTDL_BACKEND is read once, when fastdl is imported: reading the environment on every
# call would cost ~0.7 us of each op's host time.
_env_choice: str | None = os.environ.get("FASTDL_BACKEND") or None
_scoped_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastdl_backend", default=None)


def set_backend(name: str) -> None:
    """Use backend `name` ("auto", "triton", "cuda", "cpu", "torch") for every op from now on."""
    global _global_choice
    _global_choice = _check_name(name)


def get_backend() -> str:
    """The backend choice in force: "auto" or a backend name."""
    choice = _scoped_choice.get() or _global_choice or _env_choice or "auto"
    return _check_name(choice)


@contextlib.contextmanager
def use_backend(name: str):
    """`with fastdl.use_backend("cuda"): ...` runs the block with that backend."""
    token = _scoped_choice.set(_check_name(name))
    try:
        yield
    finally:
        _scoped_choice.reset(token)


# op -> backend -> dtypes its kernels take; each op registers its own (register_dtypes)
_OP_DTYPES: dict[str, dict[str, tuple]] = {}


# op -> the fastdl._C kernel family that runs it, where the names differ (rms_norm runs
# on layer_norm's kernels)
_NATIVE_KERNEL: dict[str, str] = {}


def register_dtypes(op: str, dtypes_by_backend: dict[str, tuple], native_kernel: str | None = None) -> None:
    """Declare which dtypes each backend's kernels for `op` take (and, when its name is not
    the op's, the fastdl._C kernel family it runs on)."""
    _OP_DTYPES[op] = dict(dtypes_by_backend)
    if native_kernel is not None:
        _NATIVE_KERNEL[op] = native_kernel
    forget_resolutions()


def forget_resolutions() -> None:
    """Clear what resolve remembers (its cache, and fastdl._C's memo of it, which the
    checked eager entries read): call it after changing PREFERENCE or what a backend takes."""
    _resolve_cached.cache_clear()
    if _native.LOADED:
        _native._C.forget_resolutions()


def _why_not(op: str, backend: str, device_type: str, dtype: torch.dtype) -> str | None:
    reason = why_unavailable(backend, device_type, op)
    if reason is None and dtype not in _OP_DTYPES.get(op, {}).get(backend, (dtype,)):
        reason = f"its {op} kernels do not take {dtype}"
    return reason


@functools.lru_cache(maxsize=1024)
def _resolve_cached(op: str, device_type: str, dtype: torch.dtype, choice: str) -> tuple[str | None, str | None]:
    """(backend, None) or (None, error message). What can run never changes within a process."""
    if _check_name(choice) != "auto":  # (a bad name raises ValueError, never cached)
        reason = _why_not(op, choice, device_type, dtype)
        if reason is not None:
            return None, f"fastdl.{op}: backend {choice!r} cannot run here: {reason}"
        return choice, None
    for backend in _preference(op, device_type, dtype):
        if _why_not(op, backend, device_type, dtype) is None:
            return backend, None
    return "torch", None


def _preference(op: str, device_type: str, dtype: torch.dtype) -> tuple[str, ...]:
    table = PREFERENCE.get(op, {})
    # an entry for (device, dtype) overrides the device's own
    return table.get((device_type, dtype), table.get(device_type, ("torch",)))


def within_limits(op: str, backend: str, t: torch.Tensor, dim: int) -> bool:
    """Whether t's rows and columns along dim are within backend's SIZE_LIMITS for op."""
    limit = SIZE_LIMITS.get((op, backend))
    if limit is None or t.numel() <= limit:  # (the common case: no tensor of < 2^31 elements is over)
        return True
    cols = t.shape[dim] if t.dim() else 1
    return max(cols, t.numel() // cols if cols else 0) <= limit


def runnable(op: str, t: torch.Tensor) -> list[str]:
    """Every backend that can run `op` on tensor t here, in BACKENDS order."""
    device_type = "cuda" if t.is_cuda else "cpu" if t.is_cpu else t.device.type
    return [b for b in BACKENDS if _why_not(op, b, device_type, t.dtype) is None]


def resolve(op: str, t: torch.Tensor, dim: int | None = None) -> str:
    """The backend that runs `op` on tensor t (its device and dtype) now; with `dim`, the dim
    the op reduces along, one within SIZE_LIMITS for t under "auto".

    Raises BackendUnavailableError when a named backend cannot run it.
    """
    # t.is_cuda / t.is_cpu: a tenth of the cost of t.device.type, on every call; the
    # choice as get_backend() finds it, less a call (_resolve_cached checks the name)
    device_type = "cuda" if t.is_cuda else "cpu" if t.is_cpu else t.device.type
    if t.is_nested:  # the modules then fall back to torch's, which takes them
        raise BackendUnavailableError(f"fastdl.{op}: x is a nested tensor (torch.nested), which no fastdl backend "
                                      "runs; torch's own op takes it")
    choice = _scoped_choice.get() or _global_choice or _env_choice or "auto"
    backend, error = _resolve_cached(op, device_type, t.dtype, choice)
    if error is not None:
        raise BackendUnavailableError(error)
    if dim is not None and choice == "auto" and not within_limits(op, backend, t, dim):
        backend = next((b for b in _preference(op, device_type, t.dtype)
                        if _why_not(op, b, device_type, t.dtype) is None and within_limits(op, b, t, dim)), "torch")
    return backend
