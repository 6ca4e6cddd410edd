"""Helpers shared by the Triton launchers."""
import contextlib
import functools
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# FASTDL_TRITON_AUTOTUNE=0 keeps only the first config: the test suite sets it, since it
# checks results, not speed, and every config is compile-checked (tests/triton_compile_check.py).
AUTOTUNE = os.environ.get("FASTDL_TRITON_AUTOTUNE", "1") != "0"


def autotune_configs(*num_warps_choices, **constexprs):
    """Candidate configs for @triton.autotune, the default first.

    Under the interpreter only the first is used: autotuning there fails ("0 active
    drivers") and would measure nothing real anyway.
    """
    configs = [triton.Config(dict(constexprs), num_warps=w) for w in num_warps_choices]
    return configs if AUTOTUNE and not INTERPRET else configs[:1]


def accumulator_dtype(dtype: torch.dtype):
    """fp32 accumulation for 16/32-bit floats, fp64 for fp64 (so gradcheck works)."""
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def tile_shape(n_cols: int, tile_elements: int):
    """(BLOCK_COLS, ROWS) of a one-pass row program: whole rows (BLOCK_COLS the next power
    of two), and several rows per program when they are short, ~tile_elements in all."""
    block_cols = triton.next_power_of_2(n_cols)
    return block_cols, max(1, tile_elements // block_cols)


def on_device(t: torch.Tensor):
    """The context a launch for tensor t runs in: Triton launches on the current CUDA
    device and its stream, which need not be t's (a model on cuda:1 while cuda:0 is
    current); then t's device is made current for the launch, as c10::cuda::CUDAGuard
    does for the CUDA C++ backend. Otherwise a no-op (the check costs well under a microsecond)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _device_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (read once per device); 2 for CPU tensors
    under the interpreter, so that the tests reach the code paths meant for many rows."""
    if device.type != "cuda":
        return 2
    return _device_sm_count(device.index if device.index is not None else torch.cuda.current_device())
