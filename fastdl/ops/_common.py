"""Input checks and layout helpers shared by fastdl.ops."""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.autograd.forward_ad as forward_ad
import torch.fx
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(op: str, name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"fastdl.{op}: argument {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"fastdl.{op}: argument {name} must be a floating-point tensor "
            f"(float32, float16, bfloat16 or float64), got {t.dtype}"
        )


def check_same(op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor, dtype: bool = True) -> None:
    """t has ref's device, dtype (unless dtype=False) and shape."""
    if t.device != ref.device:
        raise ValueError(f"fastdl.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; expected one device")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"fastdl.{op}: {name} is {t.dtype} but {ref_name} is {ref.dtype}; expected one dtype")
    if t.is_nested or ref.is_nested:
        return  # a strided nested tensor has no shape; the backends refuse it by name (backends.resolve)
    if t.shape != ref.shape:
        raise ValueError(f"fastdl.{op}: {name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}")


def normalize_dim(op: str, dim: int, ndim: int) -> int:
    """dim in [-ndim, ndim) -> [0, ndim); a 0-d tensor takes dim 0 or -1 (as torch)."""
    if type(dim) is int and -ndim <= dim < ndim:  # the common case in one test (host time counts)
        return dim % ndim
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"fastdl.{op}: argument dim must be an int, got {type(dim).__name__}")
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        raise IndexError(
            f"fastdl.{op}: dim {dim} is out of range for a {ndim}-D tensor (expected {-rank}..{rank - 1})"
        )
    return dim % rank


def as_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """A 2-D (rows, cols) view or copy of t with `dim` last and that dim contiguous.

    No copy when dim is already last and the leading dims collapse to one stride.
    """
    ndim = t.dim()
    if ndim == 2 and dim == 1 and (t.stride(1) == 1 or t.shape[1] <= 1):
        return t  # the common case, without the reshape's cost
    if ndim == 0:
        return t.reshape(1, 1)
    if dim != ndim - 1:
        t = t.movedim(dim, -1)
    rows = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def from_rows(rows: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of as_rows for a contiguous (rows, cols) result: a contiguous tensor of like's shape."""
    if like.dim() == 0:
        return rows.reshape(())
    if dim == like.dim() - 1:  # (not for another dim of a 2-D like: a square one's rows are its transpose)
        return rows if rows.shape == like.shape else rows.view(like.shape)
    moved = list(like.shape)
    moved.append(moved.pop(dim))
    return rows.view(moved).movedim(-1, dim).contiguous()


# The same op in torch, on a one-element tensor: asks torch which dtype it computes in
# under the autocast state in force (CUDA autocast runs softmax and layer_norm in fp32;
# CPU autocast leaves them alone), so that fastdl's drop-ins follow the same rule.
_AUTOCAST_PROBES = {
    "softmax": lambda t: torch.softmax(t, -1),
    "log_softmax": lambda t: torch.log_softmax(t, -1),
    "layer_norm": lambda t: F.layer_norm(t, (1,)),
    "rms_norm": lambda t: F.rms_norm(t, (1,), eps=1e-6),
}


def fuses_cast(x_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether an op on an x_dtype tensor computed in dtype reads x as it is and writes fp32
    (out_dtype): a 16-bit x computed in fp32, as torch.softmax(x, dtype=torch.float32) and CUDA
    autocast's softmax and norms compute it. Torch casts x first (the cast writes 4 bytes a
    value and the op reads them back: 14 bytes a value moved, 6 fused); the backward then
    writes x's gradient in x's dtype, as the cast's backward gives it. (csrc/common/checks.h's
    fused_cast_dtypes is the C++ side of the rule.)"""
    return dtype == torch.float32 and x_dtype in (torch.float16, torch.bfloat16)


def fuses_promotion(x_dtype: torch.dtype, residual_dtype: torch.dtype) -> bool:
    """Whether a fused add-norm reads x and residual of these two dtypes as they are: a 16-bit
    one beside an fp32 one (a bf16 sublayer output beside an fp32 residual stream under
    autocast), the sum and y in fp32, as torch's x + residual promotes. Torch's add reads 2 + 4
    bytes a value and writes 4, the norm reads them back and writes 4 (18); fused, 14. The
    same pair as fuses_cast (csrc/common/checks.h's fused_sum_dtypes is the C++ side)."""
    return fuses_cast(x_dtype, residual_dtype) or fuses_cast(residual_dtype, x_dtype)


# torch's state tests that the eager paths make on every call, bound once
autocast_on = torch._C._is_any_autocast_enabled
compiling = torch.compiler.is_compiling
tracing = torch._C._is_tracing  # torch.jit.trace recording
_transforms_on = torch._C._are_functorch_transforms_active  # torch.func.grad / vmap / jacrev / jvp ...


def record_fx_call(fn, args: tuple, kwargs: dict):
    """When torch.fx.symbolic_trace is tracing (an argument is an fx.Proxy): the call of
    fastdl.ops' `fn` recorded as one node of the graph, as FX records torch's own functions
    (the graph module then calls fn with tensors); else None. Only calls whose tensors are
    not all tensors ask (host time counts)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.fx.Proxy):
            return value.tracer.create_proxy("call_function", fn, args, kwargs)
    return None


@contextlib.contextmanager
def untraced():
    """Suspends torch.jit.trace's recording. While it records, a tensor's sizes read in
    Python are traced 0-d tensors, so an argument check comparing them with ints warns
    (TracerWarning) and would record size ops the graph does not need; the checks run
    untraced instead, and the op itself (a torch.library custom op) is recorded."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def composite_only() -> bool:
    """Whether the op must be plain torch ops, which every kind of autodiff sees through:
    under torch.func's transforms (whose wrapped tensors neither the C++ nor the Python
    autograd node takes), or inside a forward-mode AD dual level (torch.autograd.forward_ad),
    where fastdl's nodes, which have no forward derivative, would drop a dual input's tangent."""
    return _transforms_on() or forward_ad._current_level >= 0


@functools.lru_cache(maxsize=256)
def _autocast_probe(op: str, device: torch.device, dtype: torch.dtype, autocast_dtype: torch.dtype) -> torch.dtype:
    with torch.no_grad():
        return _AUTOCAST_PROBES[op](torch.ones(1, 1, device=device, dtype=dtype)).dtype


def autocast_dtype(op: str, x: torch.Tensor) -> torch.dtype | None:
    """The dtype torch's own `op` would compute x in under the autocast state in force,
    or None when that is x's dtype (autocast off, or it leaves this op alone).

    Under torch.compile the probe is traced (uncached): its dtype is known when the graph
    is built and its one-element tensor is dead code."""
    if not autocast_on():  # the common case in one call (host time counts)
        return None
    device_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else None  # cheaper than x.device.type
    if device_type is None or not torch.is_autocast_enabled(device_type):
        return None
    probe = _autocast_probe.__wrapped__ if compiling() else _autocast_probe
    dtype = probe(op, x.device, x.dtype, torch.get_autocast_dtype(device_type))
    return None if dtype == x.dtype else dtype
