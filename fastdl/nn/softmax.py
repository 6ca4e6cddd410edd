"""Drop-in torch.nn.Softmax / torch.nn.LogSoftmax."""
import torch

from fastdl import ops
from fastdl.backends import BackendUnavailableError
from fastdl.nn._fallback import FastModule, fall_back


class _SoftmaxModule(FastModule):
    """forward of Softmax and LogSoftmax: fastdl's op, or torch's forward as the fallback."""

    _op_name = ""  # "softmax" / "log_softmax": torch's name for the implicit dim
    _op = None  # the fastdl.ops function

    def __init__(self, dim=None, *, strict: bool = False):
        super().__init__(dim)
        self.strict = strict

    def forward(self, input):
        dim = self.dim
        if dim is None:  # torch's legacy implicit dim
            dim = torch.nn.functional._get_softmax_dim(self._op_name, input.dim(), 3)
        try:
            return self._op(input, dim)
        except BackendUnavailableError as exc:
            return fall_back(self, exc, super().forward, input)


class Softmax(_SoftmaxModule, torch.nn.Softmax):
    """torch.nn.Softmax on fastdl's kernels. `strict=True` raises instead of falling back."""

    _op_name = "softmax"
    _op = staticmethod(ops.softmax)


class LogSoftmax(_SoftmaxModule, torch.nn.LogSoftmax):
    """torch.nn.LogSoftmax on fastdl's kernels. `strict=True` raises instead of falling back."""

    _op_name = "log_softmax"
    _op = staticmethod(ops.log_softmax)
