"""Helpers shared by the Triton launchers."""
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs(*num_warps_choices, **constexprs):
    """Candidate configs for @triton.autotune.

    Under the interpreter only the first is used: autotuning there fails ("0 active
    drivers") and would measure nothing real anyway.
    """
    configs = [triton.Config(dict(constexprs), num_warps=w) for w in num_warps_choices]
    return configs[:1] if INTERPRET else configs


def accumulator_dtype(dtype: torch.dtype):
    """fp32 accumulation for 16/32-bit floats, fp64 for fp64 (so gradcheck works)."""
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32
