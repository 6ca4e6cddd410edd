"""Pure-PyTorch references, one file per op, written to be read: the ground truth
that tests run in float64, and the `torch` backend."""
from fastdl.reference.layer_norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from fastdl.reference.softmax import log_softmax, softmax, softmax_backward

__all__ = ["softmax", "log_softmax", "softmax_backward", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]
