"""fastdl.ops.layer_norm / rms_norm / add_layer_norm / add_rms_norm: checks, torch.library
registration, autograd and dispatch to the triton / cuda / cpu / torch backends.

All four are one row op, "norm": normalise each row of a (rows, N) view, N the product
of normalized_shape, with optional residual (fused add), weight and bias. Backends take
those 2-D rows and return fp32 statistics (fp64 for fp64) for the backward.
As in ops/softmax.py: eager calls of the cpu / cuda backends go through the native op
layer_norm_eager, whose autograd node is C++; those of triton / torch through an
autograd.Function (or, without grad, neither); torch.compile through the custom ops
torch.ops.fastdl.norm / norm_backward. Under torch.func's transforms (grad, vmap, jacrev,
functional_call per-sample gradients), whose wrapped tensors neither kind of autograd
node takes, and in forward-mode AD (torch.autograd.forward_ad), for which neither node has
a forward derivative: the same math in plain tensor ops, which every kind of autodiff sees through.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from fastdl import _native, backends
from fastdl._outputs import stats_dtype
from fastdl.ops._common import FLOAT_DTYPES, autocast_dtype, check_float, check_same, check_tensor, \
    compiling, composite_only, fuses_cast, fuses_promotion, record_fx_call, tracing, untraced

# the backend table's names: layer_norm (and the fused add), rms_norm (and its fused add)
OP, RMS_OP = "layer_norm", "rms_norm"
backends.register_dtypes(OP, {b: FLOAT_DTYPES for b in backends.BACKENDS})
backends.register_dtypes(RMS_OP, {b: FLOAT_DTYPES for b in backends.BACKENDS}, native_kernel=OP)


# --- the torch backend: the kernels' math in plain PyTorch ------------------------------
def _statistics(acc, dims, rms):
    """(mean, centred, var) of acc over dims (mean None for RMS, centred then acc): the
    corrected two-pass variance (Chan, Golub & LeVeque 1983), as the kernels (kernels/layer_norm.cu
    corrected_variance): the deviations' mean corrects the first mean where it is more than its
    own error, (8 eps)^2 of their mean square, so that a constant row's mean is exact and its
    norm 0. Plain differentiable ops (torch.func, create_graph)."""
    if rms:
        return None, acc, (acc * acc).mean(dims, keepdim=True)
    first_mean = acc.mean(dims, keepdim=True)
    dev = acc - first_mean
    shift = dev.mean(dims, keepdim=True)
    sq_mean = (dev * dev).mean(dims, keepdim=True)
    shift_floor2 = 2.0**-98 if acc.dtype == torch.float64 else 2.0**-40
    shift = torch.where(shift * shift > shift_floor2 * sq_mean, shift, torch.zeros_like(shift))
    var = (sq_mean - shift * shift).clamp_min(0)  # NaN stays NaN
    return first_mean + shift, dev - shift, var


def _torch_forward(x, residual, weight, bias, eps, rms, normalized_ndim=1, out_dtype=None):
    """(y, h, mean, rstd) over the last normalized_ndim dims, the statistics in x's leading
    shape (h / mean None when absent), y in out_dtype (None: x's). The torch backend runs it
    on rows; under torch.func's transforms _norm runs it on the full tensors: plain ops
    compose with grad and vmap, fastdl's autograd nodes do not."""
    h = None
    if residual is not None:
        h = x + residual
        x = h
    dims = tuple(range(-normalized_ndim, 0))
    stats_shape = x.shape[: x.dim() - normalized_ndim]
    acc = x.to(stats_dtype(x.dtype))
    mean, centred, var = _statistics(acc, dims, rms)
    rstd = torch.rsqrt(var + eps)
    y = centred * rstd
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(out_dtype or x.dtype), h, None if rms else mean.reshape(stats_shape), rstd.reshape(stats_shape)


def _torch_backward(dy, dsum, x, weight, mean, rstd, has_bias, rms, narrow_dtype=None):
    # dy in x's dtype, or in the statistics' (the gradient of an out_dtype forward's y);
    # narrow_dtype: dx also rounded to it (the 16-bit input's gradient of a mixed pair)
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
    return dx.to(x.dtype), dweight, dbias, dx.to(narrow_dtype) if narrow_dtype is not None else None


# --- dispatch ----------------------------------------------------------------------
def _rows_forward(x, residual, weight, bias, eps, rms, backend=None, out_dtype=None):
    """out_dtype: y's dtype, None (the sum's: x's, or with a residual of another dtype the
    promoted one) or the statistics' (a 16-bit x normalised into fp32, as under CUDA autocast,
    in one pass: see _norm); h in x's dtype, or the promoted one (fuses_promotion)."""
    backend = backend or backends.resolve(RMS_OP if rms else OP, x)
    if backend == "triton":
        from fastdl.triton.layer_norm import norm_forward

        return norm_forward(x, residual, weight, bias, eps, rms, out_dtype)
    if backend in ("cuda", "cpu"):
        y, h, mean, rstd = torch.ops.fastdl.layer_norm_rows_forward.default(x, residual, weight, bias, eps, rms,
                                                                            out_dtype)
        # the native op returns empty tensors for what is absent
        return y, h if residual is not None else None, mean if not rms else None, rstd
    return _torch_forward(x, residual, weight, bias, eps, rms, out_dtype=out_dtype)


def _rows_backward(dy, dsum, x, weight, mean, rstd, has_bias, rms, backend=None, narrow_dtype=None):
    """-> (dx, dweight, dbias, dx in narrow_dtype), None for what is absent. narrow_dtype:
    fp16 / bf16 beside fp32 rows, the sum of a 16-bit x and an fp32 residual (fuses_promotion),
    whose 16-bit input's gradient the backends write in the same pass as dx."""
    backend = backend or backends.resolve(RMS_OP if rms else OP, x)
    if backend == "triton":
        from fastdl.triton.layer_norm import norm_backward

        return norm_backward(dy, dsum, x, weight, mean, rstd, has_bias, rms, narrow_dtype)
    if backend in ("cuda", "cpu"):
        dx, dweight, dbias, dx_narrow = torch.ops.fastdl.layer_norm_rows_backward.default(
            dy, dsum, x, weight, mean, rstd, has_bias, rms, narrow_dtype)
        return (dx, dweight if weight is not None else None, dbias if has_bias else None,
                dx_narrow if narrow_dtype is not None else None)
    return _torch_backward(dy, dsum, x, weight, mean, rstd, has_bias, rms, narrow_dtype)


def _as_rows(t, rows, n):
    """(rows, n) view or copy of t with the last dim contiguous; None stays None."""
    if t is None:
        return None
    view = t if t.dim() == 2 and t.shape[1] == n else t.reshape(rows, n)  # 2-D: no reshape call
    return view if n <= 1 or view.is_contiguous() or view.stride(1) == 1 else view.contiguous()


def _flat(param, n):
    """weight / bias as a contiguous vector of n; None stays None."""
    if param is None or (param.dim() == 1 and param.is_contiguous()):
        return param
    return param.reshape(n).contiguous()


def _rows_and_n(t, normalized_ndim):
    if t.dim() == 2 and normalized_ndim == 1:
        return t.shape[0], t.shape[1]
    split = t.dim() - normalized_ndim
    return math.prod(t.shape[:split]), math.prod(t.shape[split:])


# The eager path calls these directly and skips every step it can: a 2-D x with one
# normalised dim needs no reshapes or views, absent outputs stay None (~1 us each saved).
def _forward(x, residual, weight, bias, normalized_ndim, eps, rms, backend=None, out_dtype=None):
    """Full-shape tensors in; (y, h, mean, rstd) out in x's shapes, h / mean None when absent,
    y in out_dtype (None: x's). On `backend`, or the one resolved now."""
    rows, n = _rows_and_n(x, normalized_ndim)
    y, h, mean, rstd = _rows_forward(_as_rows(x, rows, n), _as_rows(residual, rows, n), _flat(weight, n),
                                     _flat(bias, n), eps, rms, backend=backend, out_dtype=out_dtype)
    if x.dim() != 2 or normalized_ndim != 1:
        stats_shape = x.shape[: x.dim() - normalized_ndim]
        y, rstd = y.view(x.shape), rstd.view(stats_shape)
        h = h.view(x.shape) if h is not None else None
        mean = mean.view(stats_shape) if mean is not None else None
    return y, h, mean, rstd


def _backward(dy, dsum, h, weight, mean, rstd, has_bias, normalized_ndim, rms, backend=None, narrow_dtype=None):
    """-> (dx, dweight, dbias, dx in narrow_dtype) in the shapes and dtypes of x, weight, bias
    (None when absent); dy in h's dtype or, after an out_dtype forward, in y's. On `backend`,
    or the one resolved now. narrow_dtype as _rows_backward's."""
    rows, n = _rows_and_n(h, normalized_ndim)
    two_d = h.dim() == 2 and normalized_ndim == 1
    dx, dweight, dbias, dx_narrow = _rows_backward(
        _as_rows(dy, rows, n), _as_rows(dsum, rows, n), _as_rows(h, rows, n), _flat(weight, n),
        mean if mean is None or two_d else mean.reshape(-1), rstd if two_d else rstd.reshape(-1), has_bias, rms,
        backend=backend, narrow_dtype=narrow_dtype)
    if not two_d:
        dx = dx.view(h.shape)
        dx_narrow = dx_narrow.view(h.shape) if dx_narrow is not None else None
        param_shape = weight.shape if weight is not None else h.shape[h.dim() - normalized_ndim:]
        dweight = dweight.view(param_shape) if dweight is not None else None
        dbias = dbias.view(param_shape) if dbias is not None else None
    if dweight is not None and dweight.dtype != weight.dtype:
        dweight = dweight.to(weight.dtype)
    return dx, dweight, dbias, dx_narrow


def _or_empty(t, like):
    """A custom op returns tensors, never None: None becomes an empty tensor."""
    return t if t is not None else like.new_empty(0)


# --- torch.library registration (the torch.compile path) -------------------------
@torch.library.custom_op("fastdl::norm", mutates_args=())
def _norm_op(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
             normalized_ndim: int, eps: float, rms: bool,
             out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, h, mean, rstd = _forward(x, residual, weight, bias, normalized_ndim, eps, rms, out_dtype=out_dtype)
    return y, _or_empty(h, x), _or_empty(mean, rstd), rstd


@_norm_op.register_fake
def _(x, residual, weight, bias, normalized_ndim, eps, rms, out_dtype=None):
    stats_shape = x.shape[: x.dim() - normalized_ndim]
    sum_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    stats = stats_dtype(sum_dtype)
    h = torch.empty_like(x, dtype=sum_dtype, memory_format=torch.contiguous_format) if residual is not None \
        else x.new_empty(0)
    mean = x.new_empty(stats_shape, dtype=stats) if not rms else x.new_empty(0, dtype=stats)
    y = torch.empty_like(x, dtype=out_dtype or sum_dtype, memory_format=torch.contiguous_format)
    return y, h, mean, x.new_empty(stats_shape, dtype=stats)


@torch.library.custom_op("fastdl::norm_backward", mutates_args=())
def _norm_backward_op(dy: Tensor, dsum: Tensor | None, h: Tensor, weight: Tensor | None, mean: Tensor | None,
                      rstd: Tensor, has_bias: bool, normalized_ndim: int, rms: bool,
                      narrow_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dweight, dbias, dx_narrow = _backward(dy, dsum, h, weight, mean, rstd, has_bias, normalized_ndim, rms,
                                              narrow_dtype=narrow_dtype)
    # dbias in the dtype the fake below promises (weight's; without a weight, h's): the native
    # ops give weight's dtype when it is h's, else the statistics' dtype, as the other backends
    bias_dtype = weight.dtype if weight is not None else h.dtype
    if dbias is not None and dbias.dtype != bias_dtype:
        dbias = dbias.to(bias_dtype)
    return dx, _or_empty(dweight, h), _or_empty(dbias, h), _or_empty(dx_narrow, h)


@_norm_backward_op.register_fake
def _(dy, dsum, h, weight, mean, rstd, has_bias, normalized_ndim, rms, narrow_dtype=None):
    dweight = torch.empty_like(weight) if weight is not None else h.new_empty(0)
    dbias = h.new_empty(h.shape[h.dim() - normalized_ndim:], dtype=weight.dtype if weight is not None else h.dtype) \
        if has_bias else h.new_empty(0)
    dx_narrow = torch.empty_like(h, dtype=narrow_dtype, memory_format=torch.contiguous_format) \
        if narrow_dtype is not None else h.new_empty(0)
    return torch.empty_like(h, memory_format=torch.contiguous_format), dweight, dbias, dx_narrow


def _save(ctx, x, residual, weight, bias, normalized_ndim, eps, rms, outputs):
    y, h, mean, rstd = outputs
    ctx.fused = residual is not None
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.normalized_ndim, ctx.eps, ctx.rms = normalized_ndim, eps, rms
    # a 16-bit x beside an fp32 residual (or the other way round): the backward writes the
    # 16-bit one's gradient too, where autograd would cast dx
    ctx.narrow_dtype, ctx.narrow_is_x = None, False
    if ctx.fused and residual.dtype != x.dtype:
        ctx.narrow_is_x = x.dtype != h.dtype
        ctx.narrow_dtype = x.dtype if ctx.narrow_is_x else residual.dtype
    ctx.save_for_backward(h if ctx.fused else x, weight, mean if not rms else None, rstd)


def _grads(ctx, dy, dsum, backward):
    normalised_input, weight, mean, rstd = ctx.saved_tensors
    if dy is None:  # only the sum of a fused call was used downstream
        dy = torch.zeros_like(normalised_input)
    if dsum is not None and (not ctx.fused or dsum.numel() == 0):
        dsum = None
    dx, dweight, dbias, dx_narrow = backward(dy, dsum, normalised_input, weight, mean, rstd, ctx.has_bias,
                                             ctx.normalized_ndim, ctx.rms, narrow_dtype=ctx.narrow_dtype)
    if ctx.has_bias and dbias.dtype != ctx.bias_dtype:
        dbias = dbias.to(ctx.bias_dtype)
    dx_x, dx_residual = dx, dx if ctx.fused else None
    if ctx.narrow_dtype is not None:
        dx_x, dx_residual = (dx_narrow, dx) if ctx.narrow_is_x else (dx, dx_narrow)
    return dx_x, dx_residual, dweight if ctx.has_weight else None, dbias if ctx.has_bias else None


def _differentiable_grads(ctx, dy, dsum):
    """The gradients as differentiable functions of the inputs and of dy, for a backward
    with create_graph=True (a gradient penalty, a Hessian-vector product): the backward
    formula (fastdl/reference/layer_norm.py) in plain torch ops, with mean and rstd
    recomputed from the saved input so that the second derivative sees how they depend
    on x. Costs more than the kernels; taken only when a graph of the gradient is asked for."""
    x, weight, _, _ = ctx.saved_tensors  # x + residual when fused
    if dy is None:
        dy = torch.zeros_like(x)
    acc = stats_dtype(x.dtype)
    dims = tuple(range(x.dim() - ctx.normalized_ndim, x.dim()))
    rows = tuple(range(x.dim() - ctx.normalized_ndim))
    xa, dya = x.to(acc), dy.to(acc)
    _, centred, var = _statistics(xa, dims, ctx.rms)
    rstd = torch.rsqrt(var + ctx.eps)
    xhat = centred * rstd
    g = dya * weight.to(acc) if weight is not None else dya
    dx = g - xhat * (g * xhat).mean(dims, keepdim=True)
    if not ctx.rms:
        dx = dx - g.mean(dims, keepdim=True)
    dx = (dx * rstd).to(x.dtype)
    if dsum is not None and ctx.fused and dsum.numel() > 0:
        dx = dx + dsum
    dweight = (dya * xhat).sum(rows).to(weight.dtype) if ctx.has_weight else None
    dbias = dya.sum(rows).to(ctx.bias_dtype) if ctx.has_bias else None
    return dx, dx if ctx.fused else None, dweight, dbias


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, normalized_ndim, eps, rms = inputs[:7]
    _save(ctx, x, residual, weight, bias, normalized_ndim, eps, rms, output)


def _op_backward(ctx, dy, dsum, _dmean, _drstd):
    return *_grads(ctx, dy, dsum, _norm_backward_op), None, None, None, None


_norm_op.register_autograd(_op_backward, setup_context=_setup_context)


# --- eager path ----------------------------------------------------------------------
class _NormFunction(torch.autograd.Function):
    """Returns y, or (y, h) when fused; mean and rstd are saved for the backward, not returned."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, normalized_ndim, eps, rms, backend, out_dtype):
        outputs = _forward(x, residual, weight, bias, normalized_ndim, eps, rms, backend, out_dtype)
        _save(ctx, x, residual, weight, bias, normalized_ndim, eps, rms, outputs)
        ctx.backend = backend  # the backward runs on the forward's backend
        ctx.set_materialize_grads(False)
        y, h = outputs[0], outputs[1]
        return (y, h) if h is not None else y

    @staticmethod
    def backward(ctx, dy, dsum=None):
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable too
            return *_differentiable_grads(ctx, dy, dsum), None, None, None, None, None
        return *_grads(ctx, dy, dsum, functools.partial(_backward, backend=ctx.backend)), None, None, None, None, None


# --- eager path of the native backends ---------------------------------------------------
# x of any shape through the native op layer_norm_eager: the reshapes to rows and back, and
# the autograd node (csrc/autograd/layer_norm.cpp) when a gradient is wanted, run in C++,
# so no Python runs in the backward and a call costs less host time.
_layer_norm_eager = _native.eager_entry("layer_norm_eager")
# the public call of the common case, checked in C++ (csrc/python.cpp); None without fastdl._C,
# where no backend is native
_layer_norm_checked = _native._C.layer_norm_checked if _native.LOADED else None


# --- public API ------------------------------------------------------------------------
def _normalized_shape(op, normalized_shape):
    if type(normalized_shape) is int:  # the common cases, checked first (host time counts: see _forward)
        return (normalized_shape,)
    if type(normalized_shape) is tuple and len(normalized_shape) == 1 and type(normalized_shape[0]) is int:
        return normalized_shape  # a module's own: torch.nn.LayerNorm keeps a tuple
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise TypeError(f"fastdl.{op}: argument normalized_shape must be an int or a tuple of ints, "
                        f"got {normalized_shape!r}")
    return shape


def _check_param(op, name, param, shape, x):
    if isinstance(param, Tensor) and param.dtype in FLOAT_DTYPES and param.shape == shape and param.device == x.device:
        return  # the common case in one test (host time counts)
    check_tensor(op, name, param)
    check_float(op, name, param)
    if param.shape != shape:
        raise ValueError(f"fastdl.{op}: {name} has shape {tuple(param.shape)}, expected normalized_shape {shape}")
    if param.device != x.device:
        raise ValueError(f"fastdl.{op}: {name} is on {param.device} but x is on {x.device}; expected one device")


def _check_args(op, x, residual, normalized_shape, weight, bias):
    """-> normalized_shape as a tuple, once every argument is checked."""
    if not isinstance(x, Tensor) or x.dtype not in FLOAT_DTYPES:
        check_tensor(op, "x", x)
        check_float(op, "x", x)
    shape = _normalized_shape(op, normalized_shape)
    ndim, x_dim = len(shape), x.dim()
    if ndim == 0 or x_dim < ndim or (x.size(-1) != shape[0] if ndim == 1 else x.shape[x_dim - ndim:] != shape):
        raise ValueError(f"fastdl.{op}: normalized_shape {shape} does not match the last dims of x of shape "
                         f"{tuple(x.shape)}")
    if residual is not None:  # of x's shape and device; its dtype may differ (_norm promotes, as x + residual)
        check_tensor(op, "residual", residual)
        check_float(op, "residual", residual)
        check_same(op, "x", x, "residual", residual, dtype=False)
    if weight is not None:
        _check_param(op, "weight", weight, shape, x)
    if bias is not None:
        _check_param(op, "bias", bias, shape, x)
    return shape


def _fx_node(op, x, residual, normalized_shape, weight, bias, eps):
    """Under torch.fx.symbolic_trace: the public op's call recorded as a graph node, its
    arguments as the op takes them; else None."""
    if op.endswith("rms_norm"):
        args = (normalized_shape, weight, eps)
    else:
        args = (normalized_shape, weight, bias, eps)
    return record_fx_call(_PUBLIC_OPS[op], (x, residual, *args) if op.startswith("add_") else (x, *args), {})


def _norm(op, x, residual, normalized_shape, weight, bias, eps, rms):
    # The common eager call on a native backend, nothing recording or transforming it: its
    # arguments checked in C++ (~1.5 us less a call than the Python below), which answers
    # NotImplemented for anything else. torch.compile is ruled out first, in Python: dynamo
    # must see that test.
    if type(x) is Tensor and not compiling() and _layer_norm_checked is not None:
        out = _layer_norm_checked(x, residual, normalized_shape, weight, bias, eps, rms)
        if out is not NotImplemented:
            return out
    if type(x) is not Tensor and (node := _fx_node(op, x, residual, normalized_shape, weight, bias, eps)) is not None:
        return node
    # torch.compile and torch.jit.trace record the custom op; under torch.jit.trace the
    # checks run untraced. (Dynamo cannot call tracing(), hence compiling() first.)
    compiled = compiling()
    traced = not compiled and tracing()
    if traced:
        with untraced():
            shape = _check_args(op, x, residual, normalized_shape, weight, bias)
    else:
        shape = _check_args(op, x, residual, normalized_shape, weight, bias)
    ndim = len(shape)
    wide = x  # an input in the dtype of the sum the norm reads (x's without a residual)
    if residual is not None and residual.dtype != x.dtype:
        # as torch's x + residual: the sum in the promoted dtype, then the norm of that. A
        # 16-bit one beside an fp32 one (an fp32 residual stream beside a bf16 sublayer output
        # under autocast) is read as it is; other pairs are cast first.
        if fuses_promotion(x.dtype, residual.dtype):
            wide = residual if residual.dtype == torch.float32 else x
        else:
            common = torch.promote_types(x.dtype, residual.dtype)
            x, residual = x.to(common), residual.to(common)
            wide = x
    out_dtype = None
    if (cast := autocast_dtype("rms_norm" if rms else "layer_norm", wide)) is not None:
        # as torch under autocast: every operand in the dtype torch computes in. A 16-bit x
        # that CUDA autocast would cast to fp32 is read as it is and y written in fp32, in one
        # pass (torch's cast writes 4 bytes a value and the norm reads them back: 14 bytes a
        # value moved, 6 fused), and the backward writes dx in x's dtype, as the cast's would.
        # A fused add's sum stays in x's dtype, as torch's x + residual under autocast, and y is
        # the fp32 norm of it (10 bytes a value moved where torch's add, cast and norm move 20).
        if fuses_cast(wide.dtype, cast):
            out_dtype = cast
            weight, bias = (t.to(cast) if t is not None else None for t in (weight, bias))
        else:
            x, residual, weight, bias = (t.to(cast) if t is not None else None for t in (x, residual, weight, bias))
            wide = x
    if eps is None:
        eps = torch.finfo(out_dtype or wide.dtype).eps  # rms_norm's default, as torch: the dtype computed in
    eps = float(eps)
    if composite_only():  # torch.func.grad / vmap / jacrev ..., or forward AD
        y, h = _torch_forward(x, residual, weight, bias, eps, rms, ndim, out_dtype)[:2]
    elif compiled or traced:
        y, h = torch.ops.fastdl.norm(x, residual, weight, bias, ndim, eps, rms, out_dtype)[:2]
    elif (backend := backends.resolve(RMS_OP if rms else OP, x)) in backends.NATIVE:
        y, h = _layer_norm_eager(x, residual, weight, bias, ndim, eps, rms, out_dtype)
    elif torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad) or
                                      (weight is not None and weight.requires_grad) or
                                      (bias is not None and bias.requires_grad)):
        out = _NormFunction.apply(x, residual, weight, bias, ndim, eps, rms, backend, out_dtype)
        y, h = out if residual is not None else (out, None)
    else:
        y, h = _forward(x, residual, weight, bias, ndim, eps, rms, backend, out_dtype)[:2]
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


_PUBLIC_OPS = {"layer_norm": layer_norm, "rms_norm": rms_norm, "add_layer_norm": add_layer_norm,
               "add_rms_norm": add_rms_norm}
