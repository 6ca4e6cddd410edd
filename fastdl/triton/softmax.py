"""softmax / log_softmax over the rows of a (rows, cols) tensor: Triton kernels.

Forward, three ways by row length and row count:
  * one pass ("tile"): a program loads ROWS whole rows into registers, reduces max and
    sum there and writes the result: each element is read once and written once, the
    minimum traffic. Used while a row fits on chip (cols <= SINGLE_PASS_MAX_COLS).
  * online ("loop"): for longer rows, one program per row walks it in BLOCK_COLS
    chunks keeping a running max m and a running sum s, rescaling s whenever m grows
    (s <- s * exp(m_old - m_new) + sum exp(x - m_new); Milakov & Gimelshein 2018,
    "Online normalizer calculation for softmax"), then a second sweep writes the
    output. That second read hits L2 only when few rows are in flight: with a program a
    row and many rows it came from DRAM on the H200 (LOOP_PROGRAMS_PER_SM below).
  * split: long rows too few to give every SM several programs (a few rows over a 256k
    vocabulary) are cut into chunks, a program each: one kernel writes each chunk's
    (max, sum) pair, a second combines its row's pairs and writes its chunk.
Backward likewise, with y the forward output and dy the incoming gradient:
  softmax:      dx = y * (dy - sum(dy * y))
  log_softmax:  dx = dy - exp(y) * sum(dy)
All arithmetic in fp32 (fp64 for fp64 tensors); loads and stores in the tensor's dtype.
Row lengths and strides reach every kernel divided by ALIGN, which it multiplies back: so
Triton knows what they divide by and moves up to 16 bytes per access on rows such as 1000
fp16 values (fastdl/triton/_launch.py: row_alignment). The loop and split kernels also take
rows that start off 16-byte boundaries, all by the same amount (a 50257-wide vocabulary,
VEC > 1): they peel each row's ragged head and tail and move the rest 16 bytes at a time.

Autotuning (num_warps) is keyed on the tile shape, not the exact row length, so a
model whose lengths vary tunes once per power of two. It runs on the first call of
each shape: warm up before capturing a CUDA graph.
"""
import os

import torch
import triton
import triton.language as tl

from fastdl._outputs import empty_output, stats_dtype
from fastdl.triton._launch import (accumulator_dtype, cdiv, loop_programs, next_power_of_2, on_device, row_alignment,
                                   row_vector, sm_count, tile_shape, tuned_num_warps)

# Longest row kept whole in registers by the one-pass kernels (16k fp32 = 64 KiB a row).
SINGLE_PASS_MAX_COLS = 16384
# Chunk of a long row per loop iteration of the online kernels.
LOOP_BLOCK_COLS = 4096
# Elements one program of the tile kernels aims to hold (several short rows each).
TILE_ELEMENTS = 4096
# Long rows too few to fill the GPU one program a row (a 256k-vocabulary softmax over a
# few rows) are cut into chunks of whole LOOP_BLOCK_COLS blocks, a program each, aiming at
# this many programs per SM (the split kernels below); FASTDL_TRITON_SPLIT_PER_SM=0 turns
# the split off (to time it against the loop kernels).
SPLIT_PROGRAMS_PER_SM = int(os.environ.get("FASTDL_TRITON_SPLIT_PER_SM", "4"))
# Programs of the loop kernels: 0, a program a row; K, at most K programs an SM, each walking
# rows pid, pid + grid, ... (ROW_LOOP). The loop kernels read each row twice (forward: x;
# backward: dy and y), the second time hoping for L2. A program a row puts every row in
# flight at once, and the H200 run (3b332bb) shows the second read coming from DRAM: at
# 4096 x 65536 fp32 Triton, CUDA's block kernels and torch.compile all ran the forward at
# ~2.76 TB/s and the backward at ~2.56 TB/s counting the least traffic, i.e. 4.1-4.3 TB/s, the
# copy's rate, counting 3 and 5 moves of a row; CUDA's packed backward (one block an SM, 132 rows
# in flight) read dy twice and still ran 3.66 TB/s counting 3 moves: its second read hit L2.
# K programs an SM keep ~132 K rows in flight. 0 ran best (H200 tuner, 2b1309b, bf16 4096 x
# 65536: forward 0.408 ms, 1 / 2 / 4 an SM 0.607 / 0.510 / 0.497; backward 0.622, against 0.751
# / 0.648 / 0.658). The row loop costs registers: 5 of its sm_90 variants (fp32 log_softmax
# forward at 8 warps; the unaligned 16-bit backward) save a value or two in local memory
# (8-32 bytes), which tests/triton_compile_check.py accepts for it alone.
LOOP_PROGRAMS_PER_SM = 0


# ---------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------
@tuned_num_warps(4, 8, 16, key=["BLOCK_COLS", "ROWS"], live_tiles=1)
@triton.jit
def _softmax_forward_tile_kernel(
    x_ptr,  # input, (n_rows, n_cols), last dim contiguous
    y_ptr,  # output, (n_rows, n_cols), contiguous
    x_row_stride_vecs,  # elements between rows of x, / ALIGN
    n_rows,
    n_col_vecs,  # row length / ALIGN
    BLOCK_COLS: tl.constexpr,  # power of two >= n_cols
    ROWS: tl.constexpr,  # rows per program
    LOG: tl.constexpr,  # log_softmax instead of softmax
    ACC: tl.constexpr,  # accumulation dtype
    ALIGN: tl.constexpr,  # what n_cols and the row strides divide by (row_alignment)
):
    x_row_stride, n_cols = x_row_stride_vecs * ALIGN, n_col_vecs * ALIGN
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    col = tl.arange(0, BLOCK_COLS)[None, :]
    mask = (row < n_rows) & (col < n_cols)
    x = tl.load(x_ptr + row * x_row_stride + col, mask=mask, other=-float("inf")).to(ACC)
    row_max = tl.max(x, axis=1)[:, None]
    shifted = x - row_max
    numerator = tl.exp(shifted)  # padding: exp(-inf) = 0
    denominator = tl.sum(numerator, axis=1)[:, None]
    if LOG:
        y = shifted - tl.log(denominator)
    else:
        y = numerator / denominator
    tl.store(y_ptr + row * n_cols + col, y.to(y_ptr.dtype.element_ty), mask=mask)


# The loop and split kernels walk n elements of a row, from element `first` of each tensor
# (its row's offset plus the chunk's start). Rows whose width is not a whole number of
# 16-byte vectors (a 50257-wide vocabulary) start off 16-byte boundaries; when every tensor's
# rows are off by the same amount (VEC > 1: the launcher checks the strides), each range is
# cut alike into a ragged head up to the first boundary, a body of whole VEC-element vectors
# and a ragged tail, and the body moves 16 bytes per access. Its start is written
# cdiv(first, VEC) * VEC, a product by the constexpr, so that Triton knows it divides by VEC
# (tl.multiple_of on a scalar does not tell it). With VEC = 1 the body is the whole range.
@triton.jit
def _body_start(first, VEC: tl.constexpr):
    """The first element at or after `first` on a 16-byte boundary: first + head."""
    return tl.cdiv(first, VEC) * VEC


@triton.jit
def _ragged_edges(first, n, VEC: tl.constexpr):
    """(body length, edge): how many elements the body holds (a multiple of VEC), and the
    head's and tail's positions in the range, 2 * VEC lanes: lane i < VEC is head element i,
    lane VEC + i tail element i; -1 on the lanes past them."""
    head = tl.minimum(_body_start(first, VEC) - first, n)
    n_body = (n - head) // VEC * VEC
    lane = tl.arange(0, 2 * VEC)
    tail_lane = lane - VEC
    edge = tl.where(lane < VEC, tl.where(lane < head, lane, -1),
                    tl.where(tail_lane < n - head - n_body, head + n_body + tail_lane, -1))
    return n_body, edge


@triton.jit
def _online_max_sum(x_ptr, x_first, n, BLOCK_COLS: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr):
    """(max, sum of exp(x - max)) over the n elements of x from element x_first on."""
    n_body, edge = _ragged_edges(x_first, n, VEC)
    x_body = x_ptr + _body_start(x_first, VEC)
    # Per-lane running max and sum; lanes combine once at the end.
    m = tl.full([BLOCK_COLS], -float("inf"), ACC)
    s = tl.zeros([BLOCK_COLS], ACC)
    for start in range(0, n_body, BLOCK_COLS):
        col = start + tl.arange(0, BLOCK_COLS)
        x = tl.load(x_body + col, mask=col < n_body, other=-float("inf")).to(ACC)
        # NaN must win the max: by default a GPU max returns the other operand (maxnum), and a
        # lane whose first value is NaN would keep m = -inf and drop it (numpy's max, the
        # interpreter's, lets NaN win: tests/conftest.py gives it the GPU's maxnum instead).
        m_new = tl.maximum(m, x, propagate_nan=tl.PropagateNan.ALL)
        # s * exp(m - m_new) + exp(x - m_new), with one exp instead of two: one of m and x
        # is m_new, so one factor is exp(0) = 1 and the other exp(-|x - m|) (same bits).
        # A lane that has seen only -inf keeps m = -inf and s = 0 (-inf - -inf would be NaN);
        # a NaN in x makes m_new and the exp NaN and poisons s, as in torch.
        e = tl.exp(-tl.abs(x - m))
        s = tl.where(m_new == -float("inf"), s, tl.where(x > m, s * e + 1.0, s + e))
        m = m_new
    # the ragged head and tail: -inf where there is no element
    x_edge = tl.load(x_ptr + x_first + edge, mask=edge >= 0, other=-float("inf")).to(ACC)
    row_max = tl.maximum(tl.max(m, axis=0), tl.max(x_edge, axis=0), propagate_nan=tl.PropagateNan.ALL)
    # All -inf: max = -inf, sum 0 (the row's outputs are then NaN, as torch's). A NaN reaches
    # the sum through its lane's s, or through exp(NaN - max) at the edges.
    row_sum = (tl.sum(tl.where(m == -float("inf"), 0.0, s * tl.exp(m - row_max)), axis=0) +
               tl.sum(tl.where(x_edge == -float("inf"), 0.0, tl.exp(x_edge - row_max)), axis=0))
    return row_max, row_sum


@triton.jit
def _softmax_of(x, row_max, row_sum, log_sum, LOG: tl.constexpr):
    if LOG:
        return x - row_max - log_sum
    else:
        return tl.exp(x - row_max) / row_sum


@triton.jit
def _write_softmax(x_ptr, y_ptr, x_first, y_first, n, row_max, row_sum, BLOCK_COLS: tl.constexpr,
                   VEC: tl.constexpr, LOG: tl.constexpr, ACC: tl.constexpr):
    """y's n elements from y_first on, from x's from x_first on and the row's max and sum."""
    log_sum = tl.log(row_sum)
    n_body, edge = _ragged_edges(x_first, n, VEC)
    x_body = x_ptr + _body_start(x_first, VEC)
    y_body = y_ptr + _body_start(y_first, VEC)  # = y_ptr + y_first + head: the rows are off alike
    for start in range(0, n_body, BLOCK_COLS):
        col = start + tl.arange(0, BLOCK_COLS)
        mask = col < n_body
        x = tl.load(x_body + col, mask=mask, other=0.0).to(ACC)
        tl.store(y_body + col, _softmax_of(x, row_max, row_sum, log_sum, LOG).to(y_ptr.dtype.element_ty), mask=mask)
    x = tl.load(x_ptr + x_first + edge, mask=edge >= 0, other=0.0).to(ACC)
    tl.store(y_ptr + y_first + edge, _softmax_of(x, row_max, row_sum, log_sum, LOG).to(y_ptr.dtype.element_ty),
             mask=edge >= 0)


@triton.jit
def _softmax_forward_row(x_ptr, y_ptr, row, x_row_stride, n_cols, BLOCK_COLS: tl.constexpr, LOG: tl.constexpr,
                         ACC: tl.constexpr, VEC: tl.constexpr):
    row_max, row_sum = _online_max_sum(x_ptr, row * x_row_stride, n_cols, BLOCK_COLS, VEC, ACC)
    _write_softmax(x_ptr, y_ptr, row * x_row_stride, row * n_cols, n_cols, row_max, row_sum, BLOCK_COLS, VEC, LOG,
                   ACC)


@tuned_num_warps(8, 4, 16, key=["BLOCK_COLS", "ROW_LOOP"], live_tiles=3)
@triton.jit
def _softmax_forward_loop_kernel(
    x_ptr,  # input, (n_rows, n_cols), last dim contiguous
    y_ptr,  # output, (n_rows, n_cols), contiguous
    x_row_stride_vecs,
    n_rows,
    n_col_vecs,
    BLOCK_COLS: tl.constexpr,  # chunk walked per iteration
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    ALIGN: tl.constexpr,
    VEC: tl.constexpr,  # elements per 16 bytes when all rows are off 16-byte boundaries alike, else 1
    ROW_LOOP: tl.constexpr,  # a program walks rows pid, pid + grid, ... (LOOP_PROGRAMS_PER_SM), else one row
):
    x_row_stride, n_cols = x_row_stride_vecs * ALIGN, n_col_vecs * ALIGN
    if ROW_LOOP:
        for program_row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
            row = tl.cast(program_row, tl.int64)  # a Python int under the interpreter: no .to()
            _softmax_forward_row(x_ptr, y_ptr, row, x_row_stride, n_cols, BLOCK_COLS, LOG, ACC, VEC)
    else:
        _softmax_forward_row(x_ptr, y_ptr, tl.program_id(0).to(tl.int64), x_row_stride, n_cols, BLOCK_COLS, LOG,
                             ACC, VEC)


# Split rows: the online softmax across programs (Milakov & Gimelshein 2018, sec. 3:
# partial (max, sum) pairs combine in any grouping). Pass 1 writes each chunk's pair;
# pass 2 combines its row's pairs, in chunk order (the same bits every run), and writes
# its chunk. x is read twice, as by the loop kernel; the pairs are 8 bytes a chunk.
@tuned_num_warps(8, 4, 16, key=["BLOCK_COLS"], live_tiles=3)
@triton.jit
def _softmax_chunk_stats_kernel(
    x_ptr,  # input, (n_rows, n_cols), last dim contiguous
    max_ptr,  # (n_rows, n_chunks) fp32 / fp64: each chunk's max
    sum_ptr,  # (n_rows, n_chunks): each chunk's sum of exp(x - its max)
    x_row_stride_vecs,
    n_col_vecs,
    chunk_cols,  # columns per chunk, a multiple of BLOCK_COLS
    n_chunks,
    BLOCK_COLS: tl.constexpr,
    ACC: tl.constexpr,
    ALIGN: tl.constexpr,
    VEC: tl.constexpr,
):
    x_row_stride, n_cols = x_row_stride_vecs * ALIGN, n_col_vecs * ALIGN
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    begin = chunk.to(tl.int64) * chunk_cols  # past 2^31 in a row that long
    chunk_max, chunk_sum = _online_max_sum(x_ptr, row * x_row_stride + begin, tl.minimum(chunk_cols, n_cols - begin),
                                           BLOCK_COLS, VEC, ACC)
    tl.store(max_ptr + row * n_chunks + chunk, chunk_max)
    tl.store(sum_ptr + row * n_chunks + chunk, chunk_sum)


@tuned_num_warps(8, 4, 16, key=["BLOCK_COLS", "BLOCK_CHUNKS"], live_tiles=1)
@triton.jit
def _softmax_chunk_write_kernel(
    x_ptr,
    y_ptr,  # output, (n_rows, n_cols), contiguous
    max_ptr,
    sum_ptr,
    x_row_stride_vecs,
    n_col_vecs,
    chunk_cols,
    n_chunks,
    BLOCK_COLS: tl.constexpr,
    BLOCK_CHUNKS: tl.constexpr,  # power of two >= n_chunks
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    ALIGN: tl.constexpr,
    VEC: tl.constexpr,
):
    x_row_stride, n_cols = x_row_stride_vecs * ALIGN, n_col_vecs * ALIGN
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    c = tl.arange(0, BLOCK_CHUNKS)
    chunk_maxes = tl.load(max_ptr + row * n_chunks + c, mask=c < n_chunks, other=-float("inf"))
    chunk_sums = tl.load(sum_ptr + row * n_chunks + c, mask=c < n_chunks, other=0.0)
    row_max = tl.max(chunk_maxes, axis=0)
    # A chunk of only -inf (sum 0) adds nothing; all -inf: row_max = -inf, sum 0, outputs NaN
    # (as torch). Test the sum, not the max: a NaN in x can leave its chunk's max at -inf
    # (the max reduction may skip NaN) but always makes its sum NaN, which must reach every
    # output of the row.
    row_sum = tl.sum(tl.where(chunk_sums == 0.0, 0.0, chunk_sums * tl.exp(chunk_maxes - row_max)), axis=0)
    begin = chunk.to(tl.int64) * chunk_cols  # past 2^31 in a row that long
    _write_softmax(x_ptr, y_ptr, row * x_row_stride + begin, row * n_cols + begin,
                   tl.minimum(chunk_cols, n_cols - begin), row_max, row_sum, BLOCK_COLS, VEC, LOG, ACC)

# ---------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------
@tuned_num_warps(4, 8, 16, key=["BLOCK_COLS", "ROWS"], live_tiles=2)
@triton.jit
def _softmax_backward_tile_kernel(
    dy_ptr,  # gradient of the output, (n_rows, n_cols), last dim contiguous
    y_ptr,  # forward output, (n_rows, n_cols), last dim contiguous
    dx_ptr,  # gradient of the input, (n_rows, n_cols), contiguous
    dy_row_stride_vecs,
    y_row_stride_vecs,
    n_rows,
    n_col_vecs,
    BLOCK_COLS: tl.constexpr,
    ROWS: tl.constexpr,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    ALIGN: tl.constexpr,
):
    dy_row_stride, y_row_stride, n_cols = dy_row_stride_vecs * ALIGN, y_row_stride_vecs * ALIGN, n_col_vecs * ALIGN
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    col = tl.arange(0, BLOCK_COLS)[None, :]
    mask = (row < n_rows) & (col < n_cols)
    dy = tl.load(dy_ptr + row * dy_row_stride + col, mask=mask, other=0.0).to(ACC)
    y = tl.load(y_ptr + row * y_row_stride + col, mask=mask, other=0.0).to(ACC)
    if LOG:
        dx = dy - tl.exp(y) * tl.sum(dy, axis=1)[:, None]
    else:
        dx = y * (dy - tl.sum(dy * y, axis=1)[:, None])
    tl.store(dx_ptr + row * n_cols + col, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_dot(dy_ptr, y_ptr, dy_first, y_first, n, BLOCK_COLS: tl.constexpr, VEC: tl.constexpr, LOG: tl.constexpr,
             ACC: tl.constexpr):
    """sum(dy * y) over n elements from dy_first / y_first on, or sum(dy) for log_softmax;
    cut into head, body and tail as in _online_max_sum."""
    n_body, edge = _ragged_edges(dy_first, n, VEC)
    dy_body = dy_ptr + _body_start(dy_first, VEC)
    y_body = y_ptr + _body_start(y_first, VEC)
    acc = tl.zeros([BLOCK_COLS], ACC)
    for start in range(0, n_body, BLOCK_COLS):
        col = start + tl.arange(0, BLOCK_COLS)
        mask = col < n_body
        dy = tl.load(dy_body + col, mask=mask, other=0.0).to(ACC)
        if LOG:
            acc += dy
        else:
            acc += dy * tl.load(y_body + col, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + dy_first + edge, mask=edge >= 0, other=0.0).to(ACC)
    if not LOG:
        dy *= tl.load(y_ptr + y_first + edge, mask=edge >= 0, other=0.0).to(ACC)
    return tl.sum(acc, axis=0) + tl.sum(dy, axis=0)


@triton.jit
def _dx_of(dy, y, total, LOG: tl.constexpr):
    if LOG:
        return dy - tl.exp(y) * total
    else:
        return y * (dy - total)


@triton.jit
def _write_dx(dy_ptr, y_ptr, dx_ptr, dy_first, y_first, dx_first, n, total, BLOCK_COLS: tl.constexpr,
              VEC: tl.constexpr, LOG: tl.constexpr, ACC: tl.constexpr):
    """dx's n elements from dx_first on, from dy, y and the row's dot product."""
    n_body, edge = _ragged_edges(dy_first, n, VEC)
    dy_body = dy_ptr + _body_start(dy_first, VEC)
    y_body = y_ptr + _body_start(y_first, VEC)
    dx_body = dx_ptr + _body_start(dx_first, VEC)
    for start in range(0, n_body, BLOCK_COLS):
        col = start + tl.arange(0, BLOCK_COLS)
        mask = col < n_body
        dy = tl.load(dy_body + col, mask=mask, other=0.0).to(ACC)
        y = tl.load(y_body + col, mask=mask, other=0.0).to(ACC)
        tl.store(dx_body + col, _dx_of(dy, y, total, LOG).to(dx_ptr.dtype.element_ty), mask=mask)
    dy = tl.load(dy_ptr + dy_first + edge, mask=edge >= 0, other=0.0).to(ACC)
    y = tl.load(y_ptr + y_first + edge, mask=edge >= 0, other=0.0).to(ACC)
    tl.store(dx_ptr + dx_first + edge, _dx_of(dy, y, total, LOG).to(dx_ptr.dtype.element_ty), mask=edge >= 0)


@triton.jit
def _softmax_backward_row(dy_ptr, y_ptr, dx_ptr, row, dy_row_stride, y_row_stride, n_cols, BLOCK_COLS: tl.constexpr,
                          LOG: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr):
    total = _row_dot(dy_ptr, y_ptr, row * dy_row_stride, row * y_row_stride, n_cols, BLOCK_COLS, VEC, LOG, ACC)
    _write_dx(dy_ptr, y_ptr, dx_ptr, row * dy_row_stride, row * y_row_stride, row * n_cols, n_cols, total, BLOCK_COLS,
              VEC, LOG, ACC)


@tuned_num_warps(8, 4, 16, key=["BLOCK_COLS", "ROW_LOOP"], live_tiles=3)
@triton.jit
def _softmax_backward_loop_kernel(
    dy_ptr,
    y_ptr,
    dx_ptr,
    dy_row_stride_vecs,
    y_row_stride_vecs,
    n_rows,
    n_col_vecs,
    BLOCK_COLS: tl.constexpr,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    ALIGN: tl.constexpr,
    VEC: tl.constexpr,
    ROW_LOOP: tl.constexpr,  # as the forward's
):
    dy_row_stride, y_row_stride, n_cols = dy_row_stride_vecs * ALIGN, y_row_stride_vecs * ALIGN, n_col_vecs * ALIGN
    if ROW_LOOP:
        for program_row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
            row = tl.cast(program_row, tl.int64)  # a Python int under the interpreter: no .to()
            _softmax_backward_row(dy_ptr, y_ptr, dx_ptr, row, dy_row_stride, y_row_stride, n_cols, BLOCK_COLS, LOG,
                                  ACC, VEC)
    else:
        _softmax_backward_row(dy_ptr, y_ptr, dx_ptr, tl.program_id(0).to(tl.int64), dy_row_stride, y_row_stride,
                              n_cols, BLOCK_COLS, LOG, ACC, VEC)


# Split rows, backward: pass 1 writes each chunk's share of the row's dot product, pass 2
# adds its row's shares in chunk order and writes its chunk of dx.
@tuned_num_warps(8, 4, 16, key=["BLOCK_COLS"], live_tiles=3)
@triton.jit
def _softmax_backward_chunk_dot_kernel(
    dy_ptr,
    y_ptr,
    dot_ptr,  # (n_rows, n_chunks) fp32 / fp64
    dy_row_stride_vecs,
    y_row_stride_vecs,
    n_col_vecs,
    chunk_cols,
    n_chunks,
    BLOCK_COLS: tl.constexpr,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    ALIGN: tl.constexpr,
    VEC: tl.constexpr,
):
    dy_row_stride, y_row_stride, n_cols = dy_row_stride_vecs * ALIGN, y_row_stride_vecs * ALIGN, n_col_vecs * ALIGN
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    begin = chunk.to(tl.int64) * chunk_cols  # past 2^31 in a row that long
    share = _row_dot(dy_ptr, y_ptr, row * dy_row_stride + begin, row * y_row_stride + begin,
                     tl.minimum(chunk_cols, n_cols - begin), BLOCK_COLS, VEC, LOG, ACC)
    tl.store(dot_ptr + row * n_chunks + chunk, share)


@tuned_num_warps(8, 4, 16, key=["BLOCK_COLS", "BLOCK_CHUNKS"], live_tiles=3)
@triton.jit
def _softmax_backward_chunk_write_kernel(
    dy_ptr,
    y_ptr,
    dx_ptr,  # (n_rows, n_cols), contiguous
    dot_ptr,
    dy_row_stride_vecs,
    y_row_stride_vecs,
    n_col_vecs,
    chunk_cols,
    n_chunks,
    BLOCK_COLS: tl.constexpr,
    BLOCK_CHUNKS: tl.constexpr,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    ALIGN: tl.constexpr,
    VEC: tl.constexpr,
):
    dy_row_stride, y_row_stride, n_cols = dy_row_stride_vecs * ALIGN, y_row_stride_vecs * ALIGN, n_col_vecs * ALIGN
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    c = tl.arange(0, BLOCK_CHUNKS)
    total = tl.sum(tl.load(dot_ptr + row * n_chunks + c, mask=c < n_chunks, other=0.0), axis=0)
    begin = chunk.to(tl.int64) * chunk_cols  # past 2^31 in a row that long
    _write_dx(dy_ptr, y_ptr, dx_ptr, row * dy_row_stride + begin, row * y_row_stride + begin, row * n_cols + begin,
              tl.minimum(chunk_cols, n_cols - begin), total, BLOCK_COLS, VEC, LOG, ACC)

# ---------------------------------------------------------------------------------
# launchers: 2-D (rows, cols) tensors whose last dim is contiguous
# ---------------------------------------------------------------------------------
def split_chunks(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int]:
    """(chunks per row, columns per chunk) for a row too long for the one-pass kernels:
    (1, n_cols) when one program a row already gives SPLIT_PROGRAMS_PER_SM programs per
    SM (the loop kernels), else enough chunks of whole LOOP_BLOCK_COLS blocks to do so."""
    target = SPLIT_PROGRAMS_PER_SM * sm_count(device)  # the interpreter: 2 SMs, so a few rows split
    blocks = cdiv(n_cols, LOOP_BLOCK_COLS)
    chunks = min(cdiv(target, n_rows), blocks) if n_rows < target else 1
    if chunks <= 1:
        return 1, n_cols
    chunk_cols = cdiv(blocks, chunks) * LOOP_BLOCK_COLS
    return cdiv(n_cols, chunk_cols), chunk_cols  # no empty chunk


def softmax_forward(x: torch.Tensor, log: bool, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y in out_dtype (None: x's; fp32 beside a 16-bit x, which the kernels read as it is).
    ALIGN and VEC count x's elements, the narrower: their multiples are whole 16-byte
    vectors of y too."""
    n_rows, n_cols = x.shape
    y = empty_output((n_rows, n_cols), out_dtype or x.dtype, x.device)
    if y.numel() == 0:
        return y
    acc = accumulator_dtype(x.dtype)
    align = row_alignment(x.dtype, n_cols, x.stride(0))
    x_row_stride_vecs, n_col_vecs = x.stride(0) // align, n_cols // align
    if n_cols <= SINGLE_PASS_MAX_COLS:
        block_cols, rows = tile_shape(n_cols, TILE_ELEMENTS)
        grid = (cdiv(n_rows, rows),)
        with on_device(x):
            _softmax_forward_tile_kernel[grid](
                x, y, x_row_stride_vecs, n_rows, n_col_vecs, BLOCK_COLS=block_cols, ROWS=rows, LOG=log,
                ACC=acc, ALIGN=align,
            )
        return y
    vec = row_vector(x.dtype, (x, x.stride(0)), (y, n_cols))
    chunks, chunk_cols = split_chunks(n_rows, n_cols, x.device)
    if chunks == 1:
        with on_device(x):
            programs = loop_programs(n_rows, x.device, LOOP_PROGRAMS_PER_SM)
            _softmax_forward_loop_kernel[(programs,)](
                x, y, x_row_stride_vecs, n_rows, n_col_vecs, BLOCK_COLS=LOOP_BLOCK_COLS, LOG=log, ACC=acc,
                ALIGN=align, VEC=vec, ROW_LOOP=programs < n_rows,
            )
        return y
    stats = stats_dtype(x.dtype)
    chunk_max = torch.empty((n_rows, chunks), dtype=stats, device=x.device)
    chunk_sum = torch.empty((n_rows, chunks), dtype=stats, device=x.device)
    with on_device(x):
        _softmax_chunk_stats_kernel[(n_rows, chunks)](
            x, chunk_max, chunk_sum, x_row_stride_vecs, n_col_vecs, chunk_cols, chunks,
            BLOCK_COLS=LOOP_BLOCK_COLS, ACC=acc, ALIGN=align, VEC=vec,
        )
        _softmax_chunk_write_kernel[(n_rows, chunks)](
            x, y, chunk_max, chunk_sum, x_row_stride_vecs, n_col_vecs, chunk_cols, chunks,
            BLOCK_COLS=LOOP_BLOCK_COLS, BLOCK_CHUNKS=next_power_of_2(chunks), LOG=log, ACC=acc, ALIGN=align,
            VEC=vec,
        )
    return y


def softmax_backward(grad_out: torch.Tensor, out: torch.Tensor, log: bool,
                     grad_in_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dx in grad_in_dtype (None: out's; a 16-bit x's beside an fp32 out). ALIGN and VEC
    count dx's elements, the narrower, as softmax_forward counts x's."""
    n_rows, n_cols = out.shape
    dx = empty_output((n_rows, n_cols), grad_in_dtype or out.dtype, out.device)
    if dx.numel() == 0:
        return dx
    acc = accumulator_dtype(out.dtype)
    align = row_alignment(dx.dtype, n_cols, grad_out.stride(0), out.stride(0))
    dy_row_stride_vecs, y_row_stride_vecs = grad_out.stride(0) // align, out.stride(0) // align
    n_col_vecs = n_cols // align
    if n_cols <= SINGLE_PASS_MAX_COLS:
        block_cols, rows = tile_shape(n_cols, TILE_ELEMENTS)
        grid = (cdiv(n_rows, rows),)
        with on_device(out):
            _softmax_backward_tile_kernel[grid](
                grad_out, out, dx, dy_row_stride_vecs, y_row_stride_vecs, n_rows, n_col_vecs,
                BLOCK_COLS=block_cols, ROWS=rows, LOG=log, ACC=acc, ALIGN=align,
            )
        return dx
    vec = row_vector(dx.dtype, (grad_out, grad_out.stride(0)), (out, out.stride(0)), (dx, n_cols))
    chunks, chunk_cols = split_chunks(n_rows, n_cols, out.device)
    if chunks == 1:
        with on_device(out):
            programs = loop_programs(n_rows, out.device, LOOP_PROGRAMS_PER_SM)
            _softmax_backward_loop_kernel[(programs,)](
                grad_out, out, dx, dy_row_stride_vecs, y_row_stride_vecs, n_rows, n_col_vecs,
                BLOCK_COLS=LOOP_BLOCK_COLS, LOG=log, ACC=acc, ALIGN=align, VEC=vec, ROW_LOOP=programs < n_rows,
            )
        return dx
    chunk_dot = torch.empty((n_rows, chunks), dtype=stats_dtype(out.dtype), device=out.device)
    with on_device(out):
        _softmax_backward_chunk_dot_kernel[(n_rows, chunks)](
            grad_out, out, chunk_dot, dy_row_stride_vecs, y_row_stride_vecs, n_col_vecs,
            chunk_cols, chunks, BLOCK_COLS=LOOP_BLOCK_COLS, LOG=log, ACC=acc, ALIGN=align, VEC=vec,
        )
        _softmax_backward_chunk_write_kernel[(n_rows, chunks)](
            grad_out, out, dx, chunk_dot, dy_row_stride_vecs, y_row_stride_vecs, n_col_vecs,
            chunk_cols, chunks, BLOCK_COLS=LOOP_BLOCK_COLS,
            BLOCK_CHUNKS=next_power_of_2(chunks), LOG=log, ACC=acc, ALIGN=align, VEC=vec,
        )
    return dx
