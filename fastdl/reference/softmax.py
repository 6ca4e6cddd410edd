"""softmax and log_softmax over one dim, forward and backward, in plain PyTorch.

    softmax(x)_i     = exp(x_i - m) / sum_j exp(x_j - m),   m = max_j x_j
    log_softmax(x)_i = x_i - m - log(sum_j exp(x_j - m))

Subtracting the max changes nothing mathematically and keeps exp() from overflowing.
Backward, with y the forward's output and dy the incoming gradient:

    softmax:      dx = y * (dy - sum_j dy_j y_j)
    log_softmax:  dx = dy - exp(y) * sum_j dy_j
"""
import torch


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    m = x.amax(dim, keepdim=True)
    e = torch.exp(x - m)
    return e / e.sum(dim, keepdim=True)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    m = x.amax(dim, keepdim=True)
    shifted = x - m
    return shifted - torch.log(torch.exp(shifted).sum(dim, keepdim=True))


def softmax_backward(grad_out: torch.Tensor, out: torch.Tensor, dim: int = -1, log: bool = False) -> torch.Tensor:
    if log:
        return grad_out - torch.exp(out) * grad_out.sum(dim, keepdim=True)
    return out * (grad_out - (grad_out * out).sum(dim, keepdim=True))
