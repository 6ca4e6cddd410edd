"""Output allocation for the Python-launched (Triton) kernels, with the test hook
that poisons outputs; fastdl._C has the same hook for its kernels."""
import torch

from fastdl import _native

_poison = False


def set_poison_outputs(enabled: bool) -> None:
    """Fill every kernel output with NaN before the kernel writes it (for tests)."""
    global _poison
    _poison = bool(enabled)
    if _native.LOADED:
        torch.ops.fastdl.set_poison_outputs(_poison)


def empty_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan"))
    return out


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of saved statistics and parameter gradients: fp32, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
