"""fastdl.patch(model): swap the torch.nn modules of a live model for fastdl's.

Weights are kept as they are: the fastdl module takes over the torch module's
parameters, buffers and hooks (the very same objects), so an optimizer built before
patching keeps working and state_dict keys do not change. Only modules whose type
is exactly a supported torch.nn class are swapped; subclasses keep their own forward.
"""
from __future__ import annotations

import torch

from fastdl import nn as fnn

# torch.nn class -> fastdl.nn class; grows as ops land.
REPLACEMENTS: dict[type, type] = {
    torch.nn.Softmax: fnn.Softmax,
    torch.nn.LogSoftmax: fnn.LogSoftmax,
    torch.nn.LayerNorm: fnn.LayerNorm,
    torch.nn.RMSNorm: fnn.RMSNorm,
}


def patch(model: torch.nn.Module, strict: bool = False, verbose: bool = False) -> torch.nn.Module:
    """Replace, in place, every supported torch.nn module inside `model`; returns `model`.

    strict=True makes the swapped modules raise instead of falling back to torch
    when fastdl cannot run a call. A model that is itself a supported module is
    converted and the new module returned.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastdl.patch: argument model must be a torch.nn.Module, got {type(model).__name__}")
    swapped = []
    root = REPLACEMENTS.get(type(model))
    if root is not None:
        return root.from_torch(model, strict=strict)
    for parent_name, parent in model.named_modules():
        for name, child in list(parent._modules.items()):
            target = REPLACEMENTS.get(type(child)) if child is not None else None
            if target is not None:
                parent._modules[name] = target.from_torch(child, strict=strict)
                swapped.append(f"{parent_name + '.' if parent_name else ''}{name}: {type(child).__name__}")
    if verbose:
        print(f"fastdl.patch: replaced {len(swapped)} module(s)" + "".join(f"\n  {s}" for s in swapped))
    return model


def patched_modules(model: torch.nn.Module) -> list[str]:
    """Names of the fastdl modules inside `model`."""
    return [name for name, m in model.named_modules() if isinstance(m, fnn._fallback.FastModule)]
