"""fastdl: hand-written Triton, CUDA C++ and C++ CPU kernels for the core ops of
classic deep learning, as drop-in torch.nn modules.

    import fastdl
    y = fastdl.ops.softmax(x, dim=-1)        # one op
    model = fastdl.patch(model)              # swap a model's modules, weights kept
    model = fastdl.unpatch(model)            # and back to torch.nn (TorchScript, ONNX)
    with fastdl.use_backend("triton"): ...   # pick a backend for a block
    fastdl.enable()                          # fastdl behind torch's own softmax / layer_norm
    fastdl.available_backends()              # what runs on this machine
"""
from fastdl import nn, ops
from fastdl.aten import disable, enable, enabled, is_enabled
from fastdl.backends import (
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from fastdl.patch import patch, patched_modules, unpatch

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "disable",
    "enable",
    "enabled",
    "is_enabled",
    "get_backend",
    "nn",
    "ops",
    "patch",
    "patched_modules",
    "unpatch",
    "set_backend",
    "use_backend",
    "__version__",
]
