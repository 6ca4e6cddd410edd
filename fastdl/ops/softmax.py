"""fastdl.ops.softmax / log_softmax: the public functions, their torch.library
registration and autograd, and dispatch to the triton / cuda / cpu / torch backends.

Every backend works on a 2-D (rows, cols) tensor with the softmax dim last and
contiguous (see ops/_common.as_rows); this file does the reshaping once for all.

Three entries into the same forward/backward:
  * eager, cpu / cuda backends: the native op softmax_eager, which moves the layout and
    records its autograd node in C++ (csrc/autograd/softmax.cpp): no Python runs in the
    backward
  * eager, triton / torch backends: a torch.autograd.Function (measured on the dev
    machine: 6 us of Python overhead a call, against 11-20 us through the custom op's
    dispatcher); without a gradient to record, neither: the backend's forward alone
  * under torch.compile: the custom op torch.ops.fastdl.softmax, with a fake
    implementation and registered autograd, so graphs are traced without breaks.
Under torch.func's transforms (grad, vmap, jacrev ...) and in forward-mode AD
(torch.autograd.forward_ad) torch's own softmax runs instead: neither autograd node above
composes with the transforms, and neither has a forward derivative.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastdl import _native, backends
from fastdl import reference as R
from fastdl._outputs import stats_dtype
from fastdl.ops._common import FLOAT_DTYPES, as_rows, autocast_dtype, check_float, check_same, \
    check_tensor, compiling, composite_only, from_rows, fuses_cast, normalize_dim, record_fx_call, tracing

backends.register_dtypes("softmax", {b: FLOAT_DTYPES for b in backends.BACKENDS})


def _rows_forward(backend: str, x: Tensor, log: bool, out_dtype: torch.dtype | None = None) -> Tensor:
    """out_dtype: the output's dtype, None (x's) or fp32 for a 16-bit x (fuses_cast)."""
    if backend == "triton":
        from fastdl.triton.softmax import softmax_forward

        return softmax_forward(x, log, out_dtype)
    if backend in ("cuda", "cpu"):
        return torch.ops.fastdl.softmax_rows_forward.default(x, log, out_dtype)
    x = x if out_dtype is None else x.to(out_dtype)
    return torch.log_softmax(x, -1) if log else torch.softmax(x, -1)


def _rows_backward(backend: str, grad_out: Tensor, out: Tensor, log: bool,
                   grad_in_dtype: torch.dtype | None = None) -> Tensor:
    """grad_in_dtype: the gradient's dtype, None (out's) or x's after an out_dtype forward."""
    if backend == "triton":
        from fastdl.triton.softmax import softmax_backward

        return softmax_backward(grad_out, out, log, grad_in_dtype)
    if backend in ("cuda", "cpu"):
        return torch.ops.fastdl.softmax_rows_backward.default(grad_out, out, log, grad_in_dtype)
    if log:
        dx = torch.ops.aten._log_softmax_backward_data(grad_out, out, -1, out.dtype)
    else:
        dx = torch.ops.aten._softmax_backward_data(grad_out, out, -1, out.dtype)
    return dx if grad_in_dtype is None else dx.to(grad_in_dtype)


def _forward(x: Tensor, dim: int, log: bool, backend: str | None = None,
             out_dtype: torch.dtype | None = None) -> Tensor:
    """(log_)softmax of x along dim on `backend`, or the one resolved now; in out_dtype (None: x's)."""
    backend = backend or backends.resolve("softmax", x, dim)
    return from_rows(_rows_forward(backend, as_rows(x, dim), log, out_dtype), x, dim)


def _backward(grad_out: Tensor, out: Tensor, dim: int, log: bool, grad_in_dtype: torch.dtype | None = None) -> Tensor:
    backend = backends.resolve("softmax", out, dim)
    return from_rows(_rows_backward(backend, as_rows(grad_out, dim), as_rows(out, dim), log, grad_in_dtype), out, dim)


# --- torch.library registration (the torch.compile path) -------------------------
@torch.library.custom_op("fastdl::softmax", mutates_args=())
def _softmax_op(x: Tensor, dim: int, log: bool, out_dtype: torch.dtype | None = None) -> Tensor:
    return _forward(x, dim, log, out_dtype=out_dtype)


@_softmax_op.register_fake
def _(x, dim, log, out_dtype=None):
    return torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastdl::softmax_backward", mutates_args=())
def _softmax_backward_op(grad_out: Tensor, out: Tensor, dim: int, log: bool,
                         grad_in_dtype: torch.dtype | None = None) -> Tensor:
    return _backward(grad_out, out, dim, log, grad_in_dtype)


@_softmax_backward_op.register_fake
def _(grad_out, out, dim, log, grad_in_dtype=None):
    return torch.empty_like(out, dtype=grad_in_dtype or out.dtype, memory_format=torch.contiguous_format)


def _grad_in_dtype(x_dtype: torch.dtype, out: Tensor) -> torch.dtype | None:
    return None if x_dtype == out.dtype else x_dtype


def _setup_context(ctx, inputs, output):
    x, ctx.dim, ctx.log = inputs[:3]
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(output)


def _op_backward(ctx, grad_out):
    (out,) = ctx.saved_tensors
    dx = _softmax_backward_op(grad_out, out, ctx.dim, ctx.log, _grad_in_dtype(ctx.x_dtype, out))
    return dx, None, None, None


_softmax_op.register_autograd(_op_backward, setup_context=_setup_context)


# --- eager path ----------------------------------------------------------------
class _SoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, log, backend, out_dtype):
        out = _forward(x, dim, log, backend, out_dtype)
        ctx.dim, ctx.log, ctx.backend = dim, log, backend  # the backward runs on the forward's backend
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True (a gradient penalty, a Hessian-vector product): the formula in
            # plain torch ops, differentiable in grad_out and, through out, in x
            acc = stats_dtype(out.dtype)
            dx = R.softmax_backward(grad_out.to(acc), out.to(acc), ctx.dim, ctx.log)
            return dx.to(ctx.x_dtype), None, None, None, None
        dx = _rows_backward(ctx.backend, as_rows(grad_out, ctx.dim), as_rows(out, ctx.dim), ctx.log,
                            _grad_in_dtype(ctx.x_dtype, out))
        return from_rows(dx, out, ctx.dim), None, None, None, None


# --- public API ------------------------------------------------------------------
_softmax_eager = _native.eager_entry("softmax_eager")
# The common call (a plain float tensor, a dim in range, a float dtype or none, nothing recording or
# transforming it, a native backend), its arguments checked in C++ (csrc/python.cpp): host
# time counts, and the Python below costs ~0.8 us more a call for the same result. It
# answers NotImplemented for any other call.
_softmax_checked = _native._C.softmax_checked if _native.LOADED else None
_softmax_backward_checked = _native._C.softmax_backward_checked if _native.LOADED else None


def _softmax(op: str, x: Tensor, dim: int, dtype: torch.dtype | None, log: bool) -> Tensor:
    if type(x) is not Tensor and (node := record_fx_call(log_softmax if log else softmax, (x, dim),
                                                         {"dtype": dtype})) is not None:
        return node  # torch.fx.symbolic_trace: the call as a graph node
    check_tensor(op, "x", x)
    out_dtype = None  # the dtype computed and written in, when x is read as it is (fuses_cast)
    if dtype is not None:  # as torch: compute in dtype (x cast first, or read as it is)
        if fuses_cast(x.dtype, dtype):
            out_dtype = dtype
        else:
            x = x.to(dtype)
    check_float(op, "x", x)
    dim = normalize_dim(op, dim, x.dim())
    if dtype is None and (cast := autocast_dtype(op, x)) is not None:  # as torch under autocast
        if fuses_cast(x.dtype, cast):
            out_dtype = cast
        else:
            x = x.to(cast)
    if composite_only():
        # torch.func.grad / vmap / jacrev ... or forward AD: their tensors go through neither kind
        # of autograd node here; torch's own op composes with every transform
        return torch.log_softmax(x, dim, dtype=out_dtype) if log else torch.softmax(x, dim, dtype=out_dtype)
    # torch.compile, torch.jit.trace: the custom op, which they record (compiling() first:
    # dynamo cannot call tracing())
    if compiling() or tracing():
        return torch.ops.fastdl.softmax(x, dim, log, out_dtype)
    backend = backends.resolve("softmax", x, dim)
    if backend in backends.NATIVE:
        # the layout moves and the autograd node (when x requires grad) in C++
        # (csrc/autograd/softmax.cpp): no Python in the backward, and less host time
        return _softmax_eager(x, dim, log, out_dtype)
    if x.requires_grad and torch.is_grad_enabled():
        return _SoftmaxFunction.apply(x, dim, log, backend, out_dtype)
    return _forward(x, dim, log, backend, out_dtype)  # no graph to record


def softmax(x: Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> Tensor:
    """softmax of x along dim, as torch.softmax(x, dim, dtype=dtype).

    The output is a new contiguous tensor of x's shape (in dtype when given).
    """
    # torch.compile is ruled out first, in Python: dynamo must see that test
    if type(x) is Tensor and not compiling() and _softmax_checked is not None:
        if (out := _softmax_checked(x, dim, dtype, False)) is not NotImplemented:
            return out
    return _softmax("softmax", x, dim, dtype, log=False)


def log_softmax(x: Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> Tensor:
    """log_softmax of x along dim, as torch.log_softmax(x, dim, dtype=dtype)."""
    if type(x) is Tensor and not compiling() and _softmax_checked is not None:
        if (out := _softmax_checked(x, dim, dtype, True)) is not NotImplemented:
            return out
    return _softmax("log_softmax", x, dim, dtype, log=True)


def softmax_backward(grad_out: Tensor, out: Tensor, dim: int = -1, log: bool = False) -> Tensor:
    """Gradient of (log_)softmax's input from its output `out` and `grad_out`."""
    if type(out) is Tensor and not compiling() and _softmax_backward_checked is not None:
        if (dx := _softmax_backward_checked(grad_out, out, dim, log)) is not NotImplemented:
            return dx  # the common call, checked in C++ as softmax's
    op = "softmax_backward"
    check_tensor(op, "grad_out", grad_out)
    check_tensor(op, "out", out)
    check_float(op, "out", out)
    check_same(op, "out", out, "grad_out", grad_out)
    return _backward(grad_out, out, normalize_dim(op, dim, out.dim()), bool(log))
