"""The public functions, one file per op: checks, torch.library registration,
autograd and dispatch to the backends."""
from fastdl.ops.layer_norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from fastdl.ops.softmax import log_softmax, softmax, softmax_backward

__all__ = ["softmax", "log_softmax", "softmax_backward", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]
