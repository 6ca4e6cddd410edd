"""Drop-in replacements for torch.nn modules: same constructor (plus `strict`),
same state_dict keys, fastdl's kernels in forward and backward."""
from fastdl.nn.softmax import LogSoftmax, Softmax

__all__ = ["Softmax", "LogSoftmax"]
