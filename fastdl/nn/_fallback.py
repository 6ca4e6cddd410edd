"""The rule every fastdl.nn module follows when fastdl cannot run a call.

A configuration fastdl cannot run (a backend chosen that is not available for this
tensor, a dtype its kernels do not take) falls back to the torch module's own
forward with one warning per module class and reason; strict=True on the module, or
FASTDL_STRICT=1, raises instead.
"""
import os
import warnings

from fastdl.backends import BackendUnavailableError

_warned = set()


def strict_default() -> bool:
    return os.environ.get("FASTDL_STRICT") == "1"


def fall_back(module, exc: BackendUnavailableError, fallback, *args):
    """What a module does when its fastdl op raised `exc`: torch's forward `fallback(*args)`
    with one warning per module class and reason, or the error again when strict.

    Modules call their op directly in a `try` (no closure or bound method built per call:
    host time matters for small layers) and come here only from the `except`."""
    if module.strict or strict_default():
        raise exc
    key = (type(module).__name__, str(exc))
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{type(module).__name__}: falling back to torch: {exc}", stacklevel=3)
    return fallback(*args)


class FastModule:
    """Mixin for drop-in modules: `strict` and the way `fastdl.patch` converts a torch module.

    A fastdl module subclasses its torch module and adds no state, so state_dict keys
    match by construction and converting one keeps the very same Parameter objects
    (optimizers holding them keep working), hooks and training flag.
    """

    strict = False

    @classmethod
    def from_torch(cls, module, strict: bool = False):
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new.strict = strict
        return new
