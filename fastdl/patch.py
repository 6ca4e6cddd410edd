"""fastdl.patch(model): swap the torch.nn modules of a live model for fastdl's;
fastdl.unpatch(model) swaps them back.

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


# fastdl.nn class -> the torch.nn class it stands in for
ORIGINALS: dict[type, type] = {fast: original for original, fast in REPLACEMENTS.items()}


def _swap(model: torch.nn.Module, table: dict[type, type], convert) -> tuple[torch.nn.Module, list[str]]:
    """Replace every module of `model` whose exact type is in table by convert(module, table[type])."""
    root = table.get(type(model))
    if root is not None:
        return convert(model, root), [f"(root): {type(model).__name__}"]
    swapped = []
    for parent_name, parent in model.named_modules():
        for name, child in list(parent._modules.items()):
            target = table.get(type(child)) if child is not None else None
            if target is not None:
                parent._modules[name] = convert(child, target)
                swapped.append(f"{parent_name + '.' if parent_name else ''}{name}: {type(child).__name__}")
    return model, swapped


def patch(model: torch.nn.Module, strict: bool = False, verbose: bool = False) -> torch.nn.Module:
    """Replace, in place, every supported torch.nn module inside `model`; returns `model`.

    strict=True makes the swapped modules raise instead of falling back to torch
    when fastdl cannot run a call. A model that is itself a supported module is
    converted and the new module returned.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastdl.patch: argument model must be a torch.nn.Module, got {type(model).__name__}")
    model, swapped = _swap(model, REPLACEMENTS, lambda module, fast: fast.from_torch(module, strict=strict))
    if verbose:
        print(f"fastdl.patch: replaced {len(swapped)} module(s)" + "".join(f"\n  {s}" for s in swapped))
    return model


def _to_torch(module: torch.nn.Module, original: type) -> torch.nn.Module:
    new = original.__new__(original)
    new.__dict__.update(module.__dict__)
    new.__dict__.pop("strict", None)
    return new


def unpatch(model: torch.nn.Module, verbose: bool = False) -> torch.nn.Module:
    """Undo fastdl.patch, in place: every module patch put in becomes its torch.nn class
    again, with the very same parameters, buffers and hooks; returns `model` (or, when the
    model is itself such a module, the torch module). For what needs torch's own modules:
    TorchScript, ONNX export, comparing against torch. fastdl-only modules (AddLayerNorm,
    PreNormSequence) stay as they are."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastdl.unpatch: argument model must be a torch.nn.Module, got {type(model).__name__}")
    model, swapped = _swap(model, ORIGINALS, _to_torch)
    if verbose:
        print(f"fastdl.unpatch: restored {len(swapped)} module(s)" + "".join(f"\n  {s}" for s in swapped))
    return model


def patched_modules(model: torch.nn.Module) -> list[str]:
    """Names of the fastdl modules inside `model`."""
    return [name for name, m in model.named_modules() if isinstance(m, fnn._fallback.FastModule)]
