"""Drop-in replacements for torch.nn modules: same constructor (plus `strict`),
same state_dict keys, fastdl's kernels in forward and backward."""
from fastdl.nn.layer_norm import AddLayerNorm, AddRMSNorm, LayerNorm, PreNormSequence, RMSNorm
from fastdl.nn.softmax import LogSoftmax, Softmax

__all__ = ["Softmax", "LogSoftmax", "LayerNorm", "RMSNorm", "AddLayerNorm", "AddRMSNorm", "PreNormSequence"]
