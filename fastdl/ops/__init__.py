"""The public functions, one file per op: checks, torch.library registration,
autograd and dispatch to the backends."""
from fastdl.ops.softmax import log_softmax, softmax, softmax_backward

__all__ = ["softmax", "log_softmax", "softmax_backward"]
