"""Drop-in torch.nn.Softmax / torch.nn.LogSoftmax."""
import torch

from fastdl import ops
from fastdl.nn._fallback import FastModule, run_or_fall_back


class _SoftmaxModule(FastModule):
    """forward of Softmax and LogSoftmax: fastdl's op, or torch's forward as the fallback."""

    _op_name = ""  # "softmax" / "log_softmax": the fastdl.ops function, and torch's name for the implicit dim

    def __init__(self, dim=None, *, strict: bool = False):
        super().__init__(dim)
        self.strict = strict

    def forward(self, input):
        dim = self.dim
        if dim is None:  # torch's legacy implicit dim
            dim = torch.nn.functional._get_softmax_dim(self._op_name, input.dim(), 3)
        op = getattr(ops, self._op_name)
        return run_or_fall_back(self, lambda x: op(x, dim), super().forward, input)


class Softmax(_SoftmaxModule, torch.nn.Softmax):
    """torch.nn.Softmax on fastdl's kernels. `strict=True` raises instead of falling back."""

    _op_name = "softmax"


class LogSoftmax(_SoftmaxModule, torch.nn.LogSoftmax):
    """torch.nn.LogSoftmax on fastdl's kernels. `strict=True` raises instead of falling back."""

    _op_name = "log_softmax"
