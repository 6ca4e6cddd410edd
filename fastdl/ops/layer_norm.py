"""fastdl.ops.layer_norm / rms_norm / add_layer_norm / add_rms_norm: checks, torch.library
registration, autograd and dispatch to the triton / cuda / cpu / torch backends.

All four are one row op, "norm": normalise each row of a (rows, N) view, N the product
of normalized_shape, with optional residual (fused add), weight and bias. Backends take
those 2-D rows and return fp32 statistics (fp64 for fp64) for the backward.
As in ops/softmax.py: eager calls go through an autograd.Function (or none without
grad), torch.compile through the custom ops torch.ops.fastdl.norm / norm_backward.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastdl import backends
from fastdl._outputs import stats_dtype
from fastdl.ops._common import FLOAT_DTYPES, autocast_dtype, check_float, check_same, check_tensor

OP = "layer_norm"  # the backend table's name for the four ops
backends.register_dtypes(OP, {b: FLOAT_DTYPES for b in backends.BACKENDS})


# --- the torch backend: the kernels' math on rows, in plain PyTorch ----------------
def _torch_forward(x, residual, weight, bias, eps, rms):
    h = None
    if residual is not None:
        h = x + residual
        x = h
    acc = x.to(stats_dtype(x.dtype))
    mean = None if rms else acc.mean(1)
    centred = acc if rms else acc - mean[:, None]
    rstd = torch.rsqrt((centred * centred).mean(1) + eps)
    y = centred * rstd[:, None]
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype), h, mean, rstd


def _torch_backward(dy, dsum, x, weight, mean, rstd, has_bias, rms):
    acc_dtype = stats_dtype(x.dtype)
    xhat = (x.to(acc_dtype) - (0 if rms else mean[:, None])) * rstd[:, None]
    dy32 = dy.to(acc_dtype)
    g = dy32 * weight if weight is not None else dy32
    dx = g - xhat * (g * xhat).mean(1, keepdim=True)
    if not rms:
        dx = dx - g.mean(1, keepdim=True)
    dx = dx * rstd[:, None]
    if dsum is not None:
        dx = dx + dsum
    dweight = (dy32 * xhat).sum(0) if weight is not None else None
    dbias = dy32.sum(0) if has_bias else None
    return dx.to(x.dtype), dweight, dbias


# --- dispatch ----------------------------------------------------------------------
def _none_if_empty(t):
    return t if t is not None and t.numel() > 0 else None


def _rows_forward(x, residual, weight, bias, eps, rms):
    backend = backends.resolve(OP, x.device, x.dtype)
    if backend == "triton":
        from fastdl.triton.layer_norm import norm_forward

        return norm_forward(x, residual, weight, bias, eps, rms)
    if backend in ("cuda", "cpu"):
        y, h, mean, rstd = torch.ops.fastdl.layer_norm_rows_forward(x, residual, weight, bias, eps, rms)
        return y, _none_if_empty(h), _none_if_empty(mean), rstd
    return _torch_forward(x, residual, weight, bias, eps, rms)


def _rows_backward(dy, dsum, x, weight, mean, rstd, has_bias, rms):
    backend = backends.resolve(OP, x.device, x.dtype)
    if backend == "triton":
        from fastdl.triton.layer_norm import norm_backward

        return norm_backward(dy, dsum, x, weight, mean, rstd, has_bias, rms)
    if backend in ("cuda", "cpu"):
        dx, dweight, dbias = torch.ops.fastdl.layer_norm_rows_backward(dy, dsum, x, weight, mean, rstd, has_bias, rms)
        return dx, _none_if_empty(dweight), _none_if_empty(dbias)
    return _torch_backward(dy, dsum, x, weight, mean, rstd, has_bias, rms)


def _as_rows(t, rows, n):
    """(rows, n) view or copy of t with the last dim contiguous; None stays None."""
    if t is None:
        return None
    view = t.reshape(rows, n)
    return view if n <= 1 or view.stride(1) == 1 else view.contiguous()


def _rows_and_n(t, normalized_ndim):
    split = t.dim() - normalized_ndim
    return math.prod(t.shape[:split]), math.prod(t.shape[split:])


def _forward(x, residual, weight, bias, normalized_ndim, eps, rms):
    """Full-shape tensors in; (y, h, mean, rstd) out, with h / mean empty when absent
    (a custom op returns tensors, never None)."""
    rows, n = _rows_and_n(x, normalized_ndim)
    flat = lambda t: None if t is None else t.reshape(n).contiguous()  # noqa: E731
    y, h, mean, rstd = _rows_forward(_as_rows(x, rows, n), _as_rows(residual, rows, n), flat(weight), flat(bias),
                                     eps, rms)
    stats_shape = x.shape[: x.dim() - normalized_ndim]
    return (y.view(x.shape), h.view(x.shape) if h is not None else x.new_empty(0),
            mean.view(stats_shape) if mean is not None else rstd.new_empty(0), rstd.view(stats_shape))


def _backward(dy, dsum, h, weight, mean, rstd, has_bias, normalized_ndim, rms):
    """-> (dx, dweight, dbias) in the shapes and dtypes of x, weight, bias (empty when absent)."""
    rows, n = _rows_and_n(h, normalized_ndim)
    dx, dweight, dbias = _rows_backward(
        _as_rows(dy, rows, n), _as_rows(dsum, rows, n), _as_rows(h, rows, n),
        None if weight is None else weight.reshape(n).contiguous(),
        None if mean is None else mean.reshape(-1), rstd.reshape(-1), has_bias, rms)
    empty = h.new_empty(0)
    if dweight is not None:
        dweight = dweight.view(weight.shape).to(weight.dtype)
    if dbias is not None:
        dbias = dbias.view(weight.shape if weight is not None else h.shape[h.dim() - normalized_ndim:])
    return dx.view(h.shape), dweight if dweight is not None else empty, dbias if dbias is not None else empty


# --- torch.library registration (the torch.compile path) -------------------------
@torch.library.custom_op("fastdl::norm", mutates_args=())
def _norm_op(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
             normalized_ndim: int, eps: float, rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward(x, residual, weight, bias, normalized_ndim, eps, rms)


@_norm_op.register_fake
def _(x, residual, weight, bias, normalized_ndim, eps, rms):
    stats_shape = x.shape[: x.dim() - normalized_ndim]
    stats = stats_dtype(x.dtype)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x.new_empty(0)
    mean = x.new_empty(stats_shape, dtype=stats) if not rms else x.new_empty(0, dtype=stats)
    return torch.empty_like(x, memory_format=torch.contiguous_format), h, mean, x.new_empty(stats_shape, dtype=stats)


@torch.library.custom_op("fastdl::norm_backward", mutates_args=())
def _norm_backward_op(dy: Tensor, dsum: Tensor | None, h: Tensor, weight: Tensor | None, mean: Tensor | None,
                      rstd: Tensor, has_bias: bool, normalized_ndim: int, rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(dy, dsum, h, weight, mean, rstd, has_bias, normalized_ndim, rms)


@_norm_backward_op.register_fake
def _(dy, dsum, h, weight, mean, rstd, has_bias, normalized_ndim, rms):
    dweight = torch.empty_like(weight) if weight is not None else h.new_empty(0)
    dbias = h.new_empty(h.shape[h.dim() - normalized_ndim:], dtype=weight.dtype if weight is not None else h.dtype) \
        if has_bias else h.new_empty(0)
    return torch.empty_like(h, memory_format=torch.contiguous_format), dweight, dbias


def _save(ctx, x, residual, weight, bias, normalized_ndim, rms, outputs):
    y, h, mean, rstd = outputs
    ctx.fused = residual is not None
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.normalized_ndim, ctx.rms = normalized_ndim, rms
    ctx.save_for_backward(h if ctx.fused else x, weight, mean if not rms else None, rstd)


def _grads(ctx, dy, dsum, backward):
    normalised_input, weight, mean, rstd = ctx.saved_tensors
    if dy is None:  # only the sum of a fused call was used downstream
        dy = torch.zeros_like(normalised_input)
    if dsum is not None and (not ctx.fused or dsum.numel() == 0):
        dsum = None
    dx, dweight, dbias = backward(dy, dsum, normalised_input, weight, mean, rstd, ctx.has_bias,
                                  ctx.normalized_ndim, ctx.rms)
    return (dx, dx if ctx.fused else None, dweight if ctx.has_weight else None,
            dbias.to(ctx.bias_dtype) if ctx.has_bias else None)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, normalized_ndim, eps, rms = inputs
    _save(ctx, x, residual, weight, bias, normalized_ndim, rms, output)


def _op_backward(ctx, dy, dsum, _dmean, _drstd):
    return *_grads(ctx, dy, dsum, _norm_backward_op), None, None, None


_norm_op.register_autograd(_op_backward, setup_context=_setup_context)


# --- eager path ----------------------------------------------------------------------
class _NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, normalized_ndim, eps, rms):
        outputs = _forward(x, residual, weight, bias, normalized_ndim, eps, rms)
        _save(ctx, x, residual, weight, bias, normalized_ndim, rms, outputs)
        ctx.mark_non_differentiable(outputs[2], outputs[3])
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dsum, _dmean, _drstd):
        return *_grads(ctx, dy, dsum, _backward), None, None, None


# --- public API ------------------------------------------------------------------------
def _normalized_shape(op, normalized_shape):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise TypeError(f"fastdl.{op}: argument normalized_shape must be an int or a tuple of ints, got {normalized_shape!r}")
    return shape


def _norm(op, x, residual, normalized_shape, weight, bias, eps, rms):
    check_tensor(op, "x", x)
    check_float(op, "x", x)
    shape = _normalized_shape(op, normalized_shape)
    if len(shape) == 0 or x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"fastdl.{op}: normalized_shape {shape} does not match the last dims of x of shape "
                         f"{tuple(x.shape)}")
    if residual is not None:
        check_tensor(op, "residual", residual)
        check_same(op, "x", x, "residual", residual)
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        check_tensor(op, name, param)
        check_float(op, name, param)
        if tuple(param.shape) != shape:
            raise ValueError(f"fastdl.{op}: {name} has shape {tuple(param.shape)}, expected normalized_shape {shape}")
        if param.device != x.device:
            raise ValueError(f"fastdl.{op}: {name} is on {param.device} but x is on {x.device}; expected one device")
    if (cast := autocast_dtype("rms_norm" if rms else "layer_norm", x)) is not None:
        # as torch under autocast: every operand in the dtype torch computes in
        x, residual, weight, bias = (t.to(cast) if t is not None else None for t in (x, residual, weight, bias))
    if eps is None:
        eps = torch.finfo(x.dtype).eps  # rms_norm's default, as torch
    args = (x, residual, weight, bias, len(shape), float(eps), rms)
    if torch.compiler.is_compiling():
        outputs = torch.ops.fastdl.norm(*args)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight, bias)):
        outputs = _NormFunction.apply(*args)
    else:
        outputs = _forward(*args)
    y, h = outputs[0], outputs[1]
    return (h, y) if residual is not None else y


def layer_norm(x: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """As torch.nn.functional.layer_norm: normalise over the trailing normalized_shape dims."""
    return _norm("layer_norm", x, None, normalized_shape, weight, bias, eps, rms=False)


def rms_norm(x: Tensor, normalized_shape, weight: Tensor | None = None, eps: float | None = None) -> Tensor:
    """As torch.nn.functional.rms_norm (eps=None means torch.finfo(x.dtype).eps)."""
    return _norm("rms_norm", x, None, normalized_shape, weight, None, eps, rms=True)


def add_layer_norm(x: Tensor, residual: Tensor, normalized_shape, weight: Tensor | None = None,
                   bias: Tensor | None = None, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(x + residual, layer_norm(x + residual)) in one pass over memory."""
    return _norm("add_layer_norm", x, residual, normalized_shape, weight, bias, eps, rms=False)


def add_rms_norm(x: Tensor, residual: Tensor, normalized_shape, weight: Tensor | None = None,
                 eps: float | None = None) -> tuple[Tensor, Tensor]:
    """(x + residual, rms_norm(x + residual)) in one pass over memory."""
    return _norm("add_rms_norm", x, residual, normalized_shape, weight, None, eps, rms=True)
