"""Drop-in torch.nn.Softmax / torch.nn.LogSoftmax."""
import torch

from fastdl import ops
from fastdl.nn._fallback import FastModule, run_or_fall_back


class Softmax(FastModule, torch.nn.Softmax):
    """torch.nn.Softmax on fastdl's kernels. `strict=True` raises instead of falling back."""

    def __init__(self, dim=None, *, strict: bool = False):
        super().__init__(dim)
        self.strict = strict

    def forward(self, input):
        dim = self.dim if self.dim is not None else torch.nn.functional._get_softmax_dim("softmax", input.dim(), 3)
        return run_or_fall_back(self, lambda x: ops.softmax(x, dim), super().forward, input)


class LogSoftmax(FastModule, torch.nn.LogSoftmax):
    """torch.nn.LogSoftmax on fastdl's kernels. `strict=True` raises instead of falling back."""

    def __init__(self, dim=None, *, strict: bool = False):
        super().__init__(dim)
        self.strict = strict

    def forward(self, input):
        dim = self.dim if self.dim is not None else torch.nn.functional._get_softmax_dim("log_softmax", input.dim(), 3)
        return run_or_fall_back(self, lambda x: ops.log_softmax(x, dim), super().forward, input)
