"""Helpers shared by the Triton launchers."""
import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# FASTDL_TRITON_AUTOTUNE=0 takes the default num_warps instead of timing the choices: the
# test suite sets it, since it checks results, not speed; every choice a launch can be
# offered is compiled and checked anyway (tests/triton_compile_check.py).
AUTOTUNE = os.environ.get("FASTDL_TRITON_AUTOTUNE", "1") != "0"

# A row program keeps its tile in registers: BLOCK_COLS * ROWS values for each tile-sized
# array it holds at once, spread over 32 * num_warps threads. A thread has at most 255
# registers, and also needs them for addresses and masks: in the SASS of the kernels here
# ptxas spills to local memory from 96 tile values a thread up (the norm forward at 16384
# columns with 8 warps: 128; the norm backward at 8192 with 4 warps: 192, ~700 local loads
# and stores), never at 64 or fewer. tests/triton_compile_check.py checks every offered
# choice for fp32, fp16 and bf16.
TILE_VALUES_PER_THREAD = 64


def tuned_num_warps(*num_warps_choices, key, live_tiles):
    """Decorator for a row kernel (a @triton.jit taking BLOCK_COLS, and ROWS when a program
    holds several rows) that picks num_warps for each launch from num_warps_choices.

    live_tiles: how many tile-sized arrays the kernel holds at once (softmax forward: the
    row; its backward: dy and y; a loop kernel: its chunk and its per-lane accumulators).
    Only the choices at which the tile fits in registers are offered
    (TILE_VALUES_PER_THREAD); when none does, the most warps. With autotuning they are
    timed on the first launch of each `key` (and dtypes); without, the first offered is
    taken, so put the usual best first. Under the interpreter num_warps is ignored. The
    kernel gets `offered_num_warps(launch_args)` for the compile check.
    """

    def offered_num_warps(launch_args):
        tile_values = launch_args["BLOCK_COLS"] * launch_args.get("ROWS", 1) * live_tiles
        fit = [w for w in num_warps_choices if tile_values <= TILE_VALUES_PER_THREAD * 32 * w]
        return fit or [max(num_warps_choices)]

    def decorate(kernel):
        if AUTOTUNE and not INTERPRET:
            def prune(configs, named_args, **launch_kwargs):
                offered = offered_num_warps({**named_args, **launch_kwargs})
                return [c for c in configs if c.num_warps in offered]

            configs = [triton.Config({}, num_warps=w) for w in num_warps_choices]
            tuned = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)
        else:
            tuned = triton.heuristics({"num_warps": lambda args: offered_num_warps(args)[0]})(kernel)
        tuned.offered_num_warps = offered_num_warps
        return tuned

    return decorate


def row_alignment(dtype: torch.dtype, n_cols: int, *row_strides: int) -> int:
    """ALIGN of the row kernels: the most elements, up to 16 bytes of them, that n_cols and
    every row stride are multiples of (a power of two; 1 when n_cols is odd).

    The launchers pass n_cols and the row strides divided by ALIGN, and the kernels
    multiply them back by the constexpr: that product is how Triton learns that every row
    starts ALIGN elements apart and that the column mask changes only at multiples of
    ALIGN, so it can move 16 bytes per access. Its own specialisation marks integers only
    when they divide by 16, so a row of 1000 fp16 or fp32 values (1000 = 8 * 125) was read
    one element at a time. Whether the pointers themselves are 16-byte aligned Triton
    checks at each launch, as before.

    Triton types an integer argument by its value (int32 below 2^31), and the kernels multiply
    back in that type: rows 2^31 elements apart or more would wrap there (a stride of 2^31 + 8
    bf16 values passed as 2^28 + 1 vectors). Such strides go whole (ALIGN 1), which Triton
    types int64."""
    if max((n_cols, *row_strides)) >= 2**31:
        return 1
    align = 16 // dtype.itemsize
    common = math.gcd(n_cols, *row_strides)  # gcd(0, k) = k: an absent operand's stride 0 adds nothing
    while align > 1 and common % align:
        align //= 2
    return align


def row_vector(dtype: torch.dtype, *rows: tuple[torch.Tensor, int]) -> int:
    """VEC of the kernels that walk rows in steps: the elements in 16 bytes when the rows of
    every (tensor, row stride) given are off 16-byte boundaries by the same amount, row by
    row (16-byte aligned data and strides equal modulo a vector: contiguous rows of any
    width, 50257 included), else 1. The kernels then peel each row's ragged head and tail
    and move the rest in vectors; their results rely on the strides' part of this check."""
    vec = 16 // dtype.itemsize
    first_stride = rows[0][1]
    if all(t.data_ptr() % 16 == 0 and (stride - first_stride) % vec == 0 for t, stride in rows):
        return vec
    return 1


def accumulator_dtype(dtype: torch.dtype):
    """fp32 accumulation for 16/32-bit floats, fp64 for fp64 (so gradcheck works)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


# Host-side cdiv and next_power_of_2 for the launchers. Triton's own (triton.cdiv,
# triton.next_power_of_2) are ConstexprFunctions since 3.5, usable in kernels too, and on
# the host each call goes through their wrapper: ~2 us a call on the dev VM, a fifth of the
# Python a softmax call spent before its launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n, for n >= 1."""
    return 1 << (n - 1).bit_length()


def tile_shape(n_cols: int, tile_elements: int):
    """(BLOCK_COLS, ROWS) of a one-pass row program: whole rows (BLOCK_COLS the next power
    of two), and several rows per program when they are short, ~tile_elements in all."""
    block_cols = next_power_of_2(n_cols)
    return block_cols, max(1, tile_elements // block_cols)


def loop_programs(n_rows: int, device: torch.device, per_sm: int) -> int:
    """Programs of a loop kernel (a program a row, or fewer walking rows: ROW_LOOP) for n_rows
    rows: one a row when per_sm <= 0, else at most per_sm an SM."""
    if per_sm <= 0:
        return n_rows
    return min(n_rows, per_sm * sm_count(device))


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
