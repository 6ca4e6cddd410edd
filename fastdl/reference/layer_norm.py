"""Layer normalisation and RMS normalisation, and their fused residual-add forms, in
plain PyTorch. The norm is over the trailing dims named by normalized_shape.

    layer_norm(x) = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias     (Ba et al. 2016)
    rms_norm(x)   = x / sqrt(mean(x^2) + eps) * weight                     (Zhang & Sennrich 2019)

var is the biased variance (divide by N), as torch. add_* return (x + residual, norm(x + residual)).

Backward, with xhat the normalised input, rstd = 1 / sqrt(var + eps), g = dy * weight and
means over the normalised dims:
    layer_norm: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    rms_norm:   dx = rstd * (g - xhat * mean(g * xhat))
    dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy
"""
import torch


def _dims(normalized_shape):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return tuple(range(-len(shape), 0))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = _dims(normalized_shape)
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def rms_norm(x, normalized_shape, weight=None, eps=None):
    if eps is None:
        eps = torch.finfo(x.dtype).eps  # as torch.nn.functional.rms_norm
    dims = _dims(normalized_shape)
    y = x * torch.rsqrt((x * x).mean(dims, keepdim=True) + eps)
    return y * weight if weight is not None else y


def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    h = x + residual
    return h, layer_norm(h, normalized_shape, weight, bias, eps)


def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None):
    h = x + residual
    return h, rms_norm(h, normalized_shape, weight, eps)
