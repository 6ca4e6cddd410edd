"""fastdl.enable(): fastdl's kernels behind torch's own aten ops, so code that calls
torch.softmax, F.softmax, x.softmax(), F.log_softmax, F.layer_norm or nn.LayerNorm runs
fastdl's kernels without a change to the model. It reaches what fastdl.patch (modules
only) cannot: attention written as `scores.softmax(-1)`, a functional layer_norm.

    fastdl.enable()              # from now on, in this process
    with fastdl.enabled(): ...   # for a block only
    fastdl.disable()

Replaced, on CPU and CUDA tensors, with the backend picked as for fastdl.ops (auto,
set_backend, use_backend, FASTDL_BACKEND):
    aten::_softmax, aten::_log_softmax and their backward ops (_softmax_backward_data,
    _log_softmax_backward_data); aten::native_layer_norm and native_layer_norm_backward.
Autograd stays torch's: its formulas call the backward ops above, which are fastdl's too.
RMSNorm is not among them: torch builds rms_norm from elementwise ops (use fastdl.patch).
Under torch.compile inductor writes its own kernels for these ops; the overrides are
not traced. Each overridden call goes through Python: a few microseconds of host time
more than torch's own kernel, which matters only where the kernels take microseconds.

The overrides are registered with torch.library on the aten ops' CPU and CUDA dispatch
keys (as FlagGems does), which replaces torch's kernels until disable(): they cannot be
called from here any more. So where the backend in force is "torch", or the one chosen
cannot run a call, the override computes with plain tensor ops (exp, sum, mean ...),
never the replaced kernel; a named backend that cannot run warns once, as the modules do.
"""
from __future__ import annotations

import contextlib
import importlib
import warnings

import torch

from fastdl import backends
from fastdl._outputs import stats_dtype
from fastdl.ops._common import FLOAT_DTYPES, as_rows, from_rows, fuses_cast

# the op modules (fastdl.ops.softmax the attribute is the function, hence importlib)
_softmax_ops = importlib.import_module("fastdl.ops.softmax")
_norm_ops = importlib.import_module("fastdl.ops.layer_norm")

DISPATCH_KEYS = ("CPU", "CUDA")
_library: torch.library.Library | None = None
_warned: set[str] = set()


def _backend(op: str, t: torch.Tensor, dim: int | None = None) -> str:
    """The fastdl backend for this call (dim: the one it reduces along, for SIZE_LIMITS);
    "torch" (plain tensor ops) when the choice in force cannot run it, with one warning per
    reason."""
    if t.dtype not in FLOAT_DTYPES:
        return "torch"
    try:
        backend = backends.resolve(op, t, dim)
        if backend == "torch" and backends.get_backend() == "auto":
            # auto prefers torch's own kernel here, which the override has replaced: a fastdl
            # kernel still beats plain tensor ops
            runnable = backends.runnable(op, t)
            backend = next((b for b in ("cuda", "cpu", "triton")
                            if b in runnable and (dim is None or backends.within_limits(op, b, t, dim))), "torch")
        return backend
    except backends.BackendUnavailableError as exc:
        if str(exc) not in _warned:
            _warned.add(str(exc))
            warnings.warn(f"fastdl.enable: computing {op} with plain torch ops: {exc}", stacklevel=3)
        return "torch"


# --- softmax / log_softmax -----------------------------------------------------------
def _plain_softmax_rows(rows: torch.Tensor, log: bool) -> torch.Tensor:
    """softmax of each row with elementwise ops and reductions only (never aten::_softmax)."""
    if rows.numel() == 0:
        return torch.empty_like(rows, memory_format=torch.contiguous_format)
    acc = rows.to(stats_dtype(rows.dtype)) if rows.dtype in FLOAT_DTYPES else rows
    shifted = acc - acc.amax(-1, keepdim=True)  # an all -inf row gives NaN, as torch
    exp = shifted.exp()
    out = shifted - exp.sum(-1, keepdim=True).log() if log else exp / exp.sum(-1, keepdim=True)
    return out.to(rows.dtype)


def _plain_softmax_backward_rows(grad: torch.Tensor, out: torch.Tensor, log: bool) -> torch.Tensor:
    acc_dtype = stats_dtype(out.dtype) if out.dtype in FLOAT_DTYPES else out.dtype
    g, y = grad.to(acc_dtype), out.to(acc_dtype)
    dx = g - y.exp() * g.sum(-1, keepdim=True) if log else y * (g - (g * y).sum(-1, keepdim=True))
    return dx.to(out.dtype)


def _softmax_forward(x: torch.Tensor, dim: int, half_to_float: bool, log: bool) -> torch.Tensor:
    # half_to_float: CUDA's softmax(half, dtype=float), computed and returned in float (the
    # backends read the half x as it is and write float)
    dim = dim % max(x.dim(), 1)
    rows = as_rows(x, dim)
    backend = _backend("softmax", x, dim)
    if backend == "torch":
        out = _plain_softmax_rows(rows.float() if half_to_float else rows, log)
    else:
        out = _softmax_ops._rows_forward(backend, rows, log, torch.float32 if half_to_float else None)
    return from_rows(out, x, dim)


def _softmax_backward(grad_output: torch.Tensor, output: torch.Tensor, dim: int, input_dtype: torch.dtype,
                      log: bool) -> torch.Tensor:
    dim = dim % max(output.dim(), 1)
    if grad_output.dtype != output.dtype:
        grad_output = grad_output.to(output.dtype)
    grad_rows, out_rows = as_rows(grad_output, dim), as_rows(output, dim)
    backend = _backend("softmax", output, dim)
    if backend == "torch":
        dx = _plain_softmax_backward_rows(grad_rows, out_rows, log)
    else:  # after a half_to_float forward, dx written in the half dtype by the backend itself
        fused = fuses_cast(input_dtype, output.dtype)
        dx = _softmax_ops._rows_backward(backend, grad_rows, out_rows, log, input_dtype if fused else None)
    dx = from_rows(dx, output, dim)
    return dx if dx.dtype == input_dtype else dx.to(input_dtype)


def _softmax(x, dim, half_to_float):
    return _softmax_forward(x, dim, half_to_float, log=False)


def _log_softmax(x, dim, half_to_float):
    return _softmax_forward(x, dim, half_to_float, log=True)


def _softmax_backward_data(grad_output, output, dim, input_dtype):
    return _softmax_backward(grad_output, output, dim, input_dtype, log=False)


def _log_softmax_backward_data(grad_output, output, dim, input_dtype):
    return _softmax_backward(grad_output, output, dim, input_dtype, log=True)


# --- layer_norm ----------------------------------------------------------------------
# fastdl.ops.layer_norm's own row functions: their "torch" backend is already plain
# tensor ops (mean, rsqrt ...), never aten::native_layer_norm.
def _layer_norm_scope(x):
    """The backend _backend picks, in force for fastdl.ops.layer_norm's row functions."""
    return backends.use_backend(_backend("layer_norm", x))


def _native_layer_norm(x, normalized_shape, weight, bias, eps):
    ndim = len(normalized_shape)
    with _layer_norm_scope(x):
        y, _, mean, rstd = _norm_ops._forward(x, None, weight, bias, ndim, eps, False)
    # aten's statistics keep the normalised dims as 1s: (*leading, 1, ..., 1)
    stats_shape = tuple(x.shape[: x.dim() - ndim]) + (1,) * ndim
    return y, mean.view(stats_shape), rstd.view(stats_shape)


def _native_layer_norm_backward(grad_out, x, normalized_shape, mean, rstd, weight, bias, output_mask):
    ndim = len(normalized_shape)
    stats = stats_dtype(x.dtype)
    mean = mean.to(stats).reshape(-1)  # from our forward, or from torch's before enable()
    rstd = rstd.to(stats).reshape(-1)
    has_bias = bias is not None and output_mask[2]
    with _layer_norm_scope(x):
        dx, dweight, dbias, _ = _norm_ops._backward(grad_out, None, x, weight, mean, rstd, has_bias, ndim, False)
    # every output is a tensor: the ones autograd did not ask for are empty and go unused
    empty = x.new_empty(0)
    if dbias is not None and dbias.dtype != bias.dtype:
        dbias = dbias.to(bias.dtype)
    return dx, dweight if dweight is not None else empty, dbias if dbias is not None else empty


_OVERRIDES = {
    "_softmax": _softmax,
    "_log_softmax": _log_softmax,
    "_softmax_backward_data": _softmax_backward_data,
    "_log_softmax_backward_data": _log_softmax_backward_data,
    "native_layer_norm": _native_layer_norm,
    "native_layer_norm_backward": _native_layer_norm_backward,
}


# --- switching -----------------------------------------------------------------------
def is_enabled() -> bool:
    """True while fastdl's kernels stand behind torch's aten ops."""
    return _library is not None


def enable() -> None:
    """Put fastdl's kernels behind torch's aten softmax, log_softmax and layer_norm ops
    (forward and backward) on CPU and CUDA tensors, until disable(). Idempotent."""
    global _library
    if _library is not None:
        return
    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        # torch warns that a registered kernel is overridden: that is the point
        warnings.simplefilter("ignore")
        for name, fn in _OVERRIDES.items():
            for key in DISPATCH_KEYS:
                library.impl(name, fn, key)
    _library = library


def disable() -> None:
    """Give torch's own kernels back to its aten ops. Idempotent."""
    global _library
    if _library is not None:
        _library._destroy()
        _library = None


@contextlib.contextmanager
def enabled():
    """`with fastdl.enabled(): ...` runs the block with fastdl behind torch's aten ops, and
    leaves the state as it found it."""
    was_enabled = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was_enabled:
            disable()
