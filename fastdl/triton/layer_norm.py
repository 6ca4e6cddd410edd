"""LayerNorm / RMSNorm over the rows of a (rows, cols) tensor, optionally fused with
a residual add: Triton kernels.

One forward and one backward kernel serve all four ops through constexpr flags
(RMS, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS), each in two shapes by row length:
  * tile: a program holds ROWS whole rows in registers; one read and one write of
    every element (plus the residual and the sum when fused). The variance from the
    deviations from the mean, which their sum corrects (the corrected two-pass variance).
  * loop: for rows too long for registers, a program walks its row in chunks: a sweep
    takes mean and variance (Welford's running update in each lane, the lanes combined
    as Chan et al.'s; not sum of squares minus square of sums, which cancels
    catastrophically in fp32), then a sweep normalises and writes: two reads of the row,
    the second from L2 when few rows are in flight (LOOP_PROGRAMS_PER_SM).
Fused residual: the forward writes h = x + residual (rounded to the input dtype, as
the unfused add would) and normalises h; the backward adds the gradient that reaches h
from its other uses (dsum) to dx, which is then both d(x) and d(residual).

Backward (xhat = normalised input, g = dy * weight, means over the row):
    layer_norm: dx = rstd * (g - mean(g) - xhat * mean(g * xhat));  rms_norm drops mean(g)
    dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy
dweight / dbias are reduced in two deterministic stages: stage 1 sums blocks of rows into
the fp32 rows of a partial buffer, then one launch sums the partial rows of both in a fixed
order and writes each in its output's dtype. No atomics: two runs give bitwise-equal
gradients. Stage 1 is the tile kernel's own (each program its block of rows, whole rows in
registers); for longer rows it is a kernel of its own (_norm_param_grad_kernel: blocks of
columns x blocks of rows) that reads x and dy again. Summed by the loop kernel instead,
each program's partial row (64 KiB at 16384 fp32 columns, two of them) was read and
written for every row it walked, 2.7x the row's own traffic, from a footprint past the L2
(528 programs): ~0.9 TB/s on the H200 (4096 x 16384 bf16 at 3b332bb, fwd+bwd less fwd).
Statistics (mean, rstd) are saved in fp32 (fp64 for fp64 inputs); arithmetic likewise.
Row lengths and strides reach the kernels divided by ALIGN, as in softmax.py.
"""

import torch
import triton
import triton.language as tl

from fastdl._outputs import empty_output, stats_dtype
from fastdl.ops._common import fuses_cast
from fastdl.triton._launch import (INTERPRET, accumulator_dtype, cdiv, loop_programs, on_device, row_alignment,
                                   sm_count, tile_shape, tuned_num_warps)

# Longest row the tile kernels keep whole in registers.
FORWARD_TILE_MAX_COLS = 16384
BACKWARD_TILE_MAX_COLS = 8192
# Chunk of a row per iteration of the loop kernels. 4096 ran fastest (H200 tune of 2b1309b, bf16:
# forward 4096 x 32768 0.216 ms at 2048 -> 0.182; fwd+bwd 4096 x 16384 0.316 -> 0.298; 1024: 0.218,
# 0.329), but then spilled 8 bytes a thread at 8 warps in 4 variants. Session 39 compiled every
# loop variant at 4096 for sm_90: the forward spills no more but in 2 of its row-walking variants
# (ROW_LOOP, off by default; 8 bytes, which the compile check accepts there, as in 1 of the
# backward's); the backward's 8 warps spilled in two (bf16, aligned, layer_norm with and without
# the fused add), so its loop kernel counts 5 live tiles and takes 16 warps at 4096. Both kernels
# have changed since that tune (the forward's statistics, session 37): untimed as they are now.
LOOP_BLOCK_COLS = 4096
# Programs of the loop kernels (forward past FORWARD_TILE_MAX_COLS, the backward's dx past
# BACKWARD_TILE_MAX_COLS), which read a row again in a second sweep: 0, a program a row; K, at
# most K programs an SM, each walking rows (ROW_LOOP), so that fewer rows are in flight and the
# second sweep's reads can come from L2 (as softmax.py's LOOP_PROGRAMS_PER_SM, which says why).
# 0: timed best (H200 tune of 2b1309b, bf16: 4096 x 32768 forward 0.217 ms,
# 1 / 2 / 4 programs an SM 0.421 / 0.252 / 0.222; fwd+bwd 4096 x 16384 0.315 against 0.415 /
# 0.340 / 0.330, with 2048-column chunks). tests/triton_compile_check.py compiles the row loop
# for rows and parameters of one dtype with a weight; every ROW_LOOP variant of the forward
# compiled for sm_90 without spilling (session 31, its one-sweep statistics; before them 3 of the fused forward at
# 16 warps kept 8 bytes in local memory, which ROW_LOOP_SPILL_BYTES accepts).
LOOP_PROGRAMS_PER_SM = 0
# Elements a tile program aims to hold (several short rows each). 2048 (was 4096): fwd+bwd
# 4096 x 1024 0.062 -> 0.045 ms, the forward alone 0.0087 -> 0.0086 (H200 tune of 2b1309b,
# bf16).
TILE_ELEMENTS = 2048
# Backward tile programs per SM: each reduces its rows' dweight into one partial row. 2 (was
# 4): fwd+bwd 4096 x 1024 0.062 -> 0.050 ms, 16384 x 4096 0.241 -> 0.218 (H200 tune of
# 2b1309b, bf16; 1: 0.050, 0.278; 8: 0.085, 0.287).
PROGRAMS_PER_SM = 2
# The tile kernel sums its rows' dweight / dbias (True: programs that walk PROGRAMS_PER_SM's
# blocks of rows), or leaves them to _norm_param_grad_kernel, as for longer rows (False: a
# tile a program, no loop, as the forward; x and dy read again, from L2 when small).
TILE_PARAM_SUMS = True
# The walking backward tile (TILE_PARAM_SUMS) loads its next tile's x, dy, mean and rstd before
# this tile's sums, so that two tiles' loads are in flight (as CUDA's backward tile since
# a6aa72b): the H200 profile of 2b1309b had it at 27.3 us for 4096 x 1024 bf16 (24 MiB), 2
# programs an SM. Tiles of TILE_ELEMENTS at most (rows to 2048 columns): longer ones hold too
# many values a thread for two. Off until a GPU times it (tune.py: True / False at 4096 x 512 /
# 1024 and 16384 x 1024).
TILE_PREFETCH = False
# Longer rows' dweight / dbias (_norm_param_grad_kernel): columns and rows a program holds
# at once, and programs an SM (over column blocks x row blocks, a partial row each block).
# PARAM_BLOCK_COLS 128 (was 256): fwd+bwd 4096 x 16384 0.315 -> 0.296 ms (H200 tune of
# 2b1309b, bf16; PARAM_ROWS 8 and PARAM_PROGRAMS_PER_SM 2 were within 1.5% of their defaults).
PARAM_BLOCK_COLS = 128
PARAM_ROWS = 16
PARAM_PROGRAMS_PER_SM = 8
# The partial-row sum: columns a program, partial rows an iteration. SUM_BLOCK_COLS 8 (was
# 64; 32-byte rows of a tile): the H200 tune of 2b1309b (bf16 fwd+bwd) ran 64 / 32 / 16 at 4096
# x 512 in 0.055 / 0.044 / 0.040 ms, at 4096 x 1024 0.062 / 0.049 / 0.045, and its profile the
# sum at 64 in 45.6 us of 0.062 ms (16 programs on 132 SMs, 6% occupancy). 8: UNTIMED.
SUM_BLOCK_COLS = 8
SUM_ROWS = 32
# Under the interpreter (CPU tensors: the test suite) every program is a Python call, ~9 ms of
# this kernel's: at 8 columns a program a backward of 20000 columns ran 2500 of them, 90% of its
# time (65536 columns: 8192). There a program sums at least INTERPRET_SUM_BLOCK_COLS columns. A
# column's sum is the same at any width (its partial rows added in the same order), and
# tests/test_triton_launch.py runs SUM_BLOCK_COLS itself against this width, bit for bit.
INTERPRET_SUM_BLOCK_COLS = 128


def _sum_block_cols() -> int:
    return max(SUM_BLOCK_COLS, INTERPRET_SUM_BLOCK_COLS) if INTERPRET else SUM_BLOCK_COLS


# ---------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------
@tuned_num_warps(4, 8, 16, key=["BLOCK_COLS", "ROWS"], live_tiles=2)
@triton.jit
def _norm_forward_tile_kernel(
    x_ptr,  # input (n_rows, n_cols), last dim contiguous
    residual_ptr,  # residual, same shape (read when HAS_RESIDUAL)
    weight_ptr,  # (n_cols,) (read when HAS_WEIGHT)
    bias_ptr,  # (n_cols,) (read when HAS_BIAS)
    y_ptr,  # output (n_rows, n_cols), contiguous
    sum_ptr,  # x + residual (n_rows, n_cols), contiguous (written when HAS_RESIDUAL)
    mean_ptr,  # (n_rows,) statistics (written unless RMS)
    rstd_ptr,  # (n_rows,) 1 / sqrt(var + eps)
    x_row_stride_vecs,  # elements between rows of x, / ALIGN
    residual_row_stride_vecs,
    n_rows,
    n_col_vecs,  # row length / ALIGN
    eps,
    BLOCK_COLS: tl.constexpr,
    ROWS: tl.constexpr,
    RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    ALIGN: tl.constexpr,  # what n_cols and the row strides divide by (row_alignment)
):
    x_row_stride, residual_row_stride = x_row_stride_vecs * ALIGN, residual_row_stride_vecs * ALIGN
    n_cols = n_col_vecs * ALIGN
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row = rows[:, None]
    col = tl.arange(0, BLOCK_COLS)[None, :]
    col_mask = col < n_cols
    mask = (row < n_rows) & col_mask
    x = tl.load(x_ptr + row * x_row_stride + col, mask=mask, other=0.0).to(ACC)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * residual_row_stride + col, mask=mask, other=0.0).to(ACC)
        h = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * n_cols + col, h, mask=mask)
        x = h.to(ACC)  # normalise the sum as stored, as the unfused add would
    if RMS:
        var = tl.sum(x * x, axis=1) / n_cols
    else:
        mean = tl.sum(x, axis=1) / n_cols
        dev = tl.where(col_mask, x - mean[:, None], 0.0)
        # the corrected two-pass variance (Chan, Golub & LeVeque 1983): the deviations' sum, n
        # times the first mean's error, corrects it where it is more than its own error, (8 eps)^2
        # of the mean square (kernels/layer_norm.cu corrected_variance says more: a constant row's
        # norm comes out exactly 0, its mean exact). Two tl.sum, not one tl.reduce of the pair:
        # the interpreter adds a custom combine's terms in order, tl.sum's pairwise (4096 columns
        # of 1000 +- 0.01: rstd 1e-5 off, against 7e-8).
        shift = tl.sum(dev, axis=1) / n_cols
        sq_mean = tl.sum(dev * dev, axis=1) / n_cols
        if ACC == tl.float64:
            shift_floor2 = 2.0**-98
        else:
            shift_floor2 = 2.0**-40
        shift = tl.where(shift * shift > shift_floor2 * sq_mean, shift, 0.0)
        mean += shift
        var = sq_mean - shift * shift
        var = tl.where(var < 0.0, 0.0, var)  # a hair below 0 from rounding (NaN stays NaN)
        tl.store(mean_ptr + rows, mean, mask=rows < n_rows)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)
    if RMS:
        y = x * rstd[:, None]
    else:
        # (dev - shift) * rstd in y's own line: kept as a tile of its own, the deviations less
        # shift cost the fp32 1024 x 4 tile of 512 threads 8 bytes of spill (sm_90)
        y = (dev - shift[:, None]) * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(weight_ptr + col, mask=col_mask, other=0.0).to(ACC)
    if HAS_BIAS:
        y += tl.load(bias_ptr + col, mask=col_mask, other=0.0).to(ACC)
    tl.store(y_ptr + row * n_cols + col, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_forward_row(x_ptr, residual_ptr, weight_ptr, bias_ptr, y_ptr, sum_ptr, mean_ptr, rstd_ptr, row,
                      x_row_stride, residual_row_stride, n_cols, eps, BLOCK_COLS: tl.constexpr, RMS: tl.constexpr,
                      HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      ACC: tl.constexpr):
    """The loop kernel's work on one row, `row` (int64), in sweeps."""
    x_row = x_ptr + row * x_row_stride
    sum_row = sum_ptr + row * n_cols
    # the row sweep 2 normalises: the stored sum when fused, else x
    if HAS_RESIDUAL:
        src_row = sum_row
    else:
        src_row = x_row
    # sweep 1: the sum (written when fused), and the row's statistics: its sum of squares
    # (RMS), or each lane's running mean and squared deviations from it (Welford 1962), then
    # combined: the variance in one read of the row, as stable as from deviations of the mean
    # (not the sum of squares less the squared sum, which cancels catastrophically in fp32)
    acc_sq = tl.zeros([BLOCK_COLS], ACC)
    lane_mean = tl.zeros([BLOCK_COLS], ACC)
    for start in range(0, n_cols, BLOCK_COLS):
        col = start + tl.arange(0, BLOCK_COLS)
        mask = col < n_cols
        x = tl.load(x_row + col, mask=mask, other=0.0).to(ACC)
        if HAS_RESIDUAL:
            x += tl.load(residual_ptr + row * residual_row_stride + col, mask=mask, other=0.0).to(ACC)
            h = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_row + col, h, mask=mask)
            x = h.to(ACC)
        if RMS:
            acc_sq += x * x
        else:
            # a lane in the row now was in every chunk before (they were whole): its count is
            # this chunk's number, the same for all; a lane past the row's end adds nothing
            delta = tl.where(mask, x - lane_mean, 0.0)
            lane_mean += delta * (1.0 / tl.cast(start // BLOCK_COLS + 1, ACC))
            acc_sq += delta * (x - lane_mean)
    if RMS:
        mean = 0.0
        var = tl.sum(acc_sq, axis=0) / n_cols
    else:
        # the lanes' states as one (Chan et al. 1979): the mean of their means weighted by their
        # counts, and their squared deviations plus each lane mean's from it, count times (a
        # lane past the row's end: count 0, adds nothing). The means weighted as differences
        # from lane 0's (which holds the row's first column): a constant row's lanes all hold
        # its value, and its mean comes out exact, where the sum of that value times each count,
        # over n, may round (kernels/common/reduce.cuh block_mean_m2, the same)
        lanes = tl.arange(0, BLOCK_COLS)
        lane_count = (tl.maximum(n_cols - lanes + BLOCK_COLS - 1, 0) // BLOCK_COLS).to(ACC)  # chunks a lane was in
        first = tl.sum(tl.where(lanes == 0, lane_mean, 0.0), axis=0)
        mean = first + tl.sum(lane_count * (lane_mean - first), axis=0) / n_cols
        lane_dev = lane_mean - mean
        m2 = tl.sum(acc_sq + lane_count * lane_dev * lane_dev, axis=0)
        tl.store(mean_ptr + row, mean)
        var = m2 / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(rstd_ptr + row, rstd)
    # sweep 2: normalise and write (the row read again, from L2 when few rows are in flight)
    for start in range(0, n_cols, BLOCK_COLS):
        col = start + tl.arange(0, BLOCK_COLS)
        mask = col < n_cols
        x = tl.load(src_row + col, mask=mask, other=0.0).to(ACC)
        y = (x - mean) * rstd
        if HAS_WEIGHT:
            y *= tl.load(weight_ptr + col, mask=mask, other=0.0).to(ACC)
        if HAS_BIAS:
            y += tl.load(bias_ptr + col, mask=mask, other=0.0).to(ACC)
        tl.store(y_ptr + row * n_cols + col, y.to(y_ptr.dtype.element_ty), mask=mask)


@tuned_num_warps(8, 4, 16, key=["BLOCK_COLS", "ROW_LOOP"], live_tiles=3)
@triton.jit
def _norm_forward_loop_kernel(
    x_ptr, residual_ptr, weight_ptr, bias_ptr, y_ptr, sum_ptr, mean_ptr, rstd_ptr,
    x_row_stride_vecs, residual_row_stride_vecs, n_rows, n_col_vecs, eps,
    BLOCK_COLS: tl.constexpr,
    RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    ALIGN: tl.constexpr,
    ROW_LOOP: tl.constexpr,  # a program walks rows pid, pid + grid, ... (LOOP_PROGRAMS_PER_SM), else one row
):
    x_row_stride, residual_row_stride = x_row_stride_vecs * ALIGN, residual_row_stride_vecs * ALIGN
    n_cols = n_col_vecs * ALIGN
    if ROW_LOOP:
        for program_row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
            row = tl.cast(program_row, tl.int64)  # a Python int under the interpreter: no .to()
            _norm_forward_row(x_ptr, residual_ptr, weight_ptr, bias_ptr, y_ptr, sum_ptr, mean_ptr, rstd_ptr, row,
                              x_row_stride, residual_row_stride, n_cols, eps, BLOCK_COLS, RMS, HAS_RESIDUAL,
                              HAS_WEIGHT, HAS_BIAS, ACC)
    else:
        _norm_forward_row(x_ptr, residual_ptr, weight_ptr, bias_ptr, y_ptr, sum_ptr, mean_ptr, rstd_ptr,
                          tl.program_id(0).to(tl.int64), x_row_stride, residual_row_stride, n_cols, eps, BLOCK_COLS,
                          RMS, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, ACC)


# ---------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------
@triton.jit
def _load_backward_rows(x_ptr, dy_ptr, mean_ptr, rstd_ptr, start, last, col, col_mask, x_row_stride, dy_row_stride,
                        ROWS: tl.constexpr, RMS: tl.constexpr):
    """x and dy of the ROWS rows from `start` (those before `last`) as stored, and their mean (0
    for RMS) and rstd: masked loads, converted where used."""
    rows = start + tl.arange(0, ROWS)
    row = rows[:, None]
    row_mask = rows < last
    mask = row_mask[:, None] & col_mask
    x = tl.load(x_ptr + row * x_row_stride + col, mask=mask, other=0.0)
    dy = tl.load(dy_ptr + row * dy_row_stride + col, mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    if RMS:
        mean = tl.zeros([ROWS], rstd.dtype)
    else:
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
    return x, dy, mean, rstd


@tuned_num_warps(4, 8, 16, key=["BLOCK_COLS", "ROWS"], live_tiles=3)
@triton.jit
def _norm_backward_tile_kernel(
    dy_ptr,  # gradient of y (n_rows, n_cols), last dim contiguous
    dsum_ptr,  # gradient reaching x + residual from elsewhere (read when HAS_DSUM)
    x_ptr,  # the normalised input: x, or x + residual when fused
    weight_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,  # (n_rows, n_cols) contiguous
    dx_narrow_ptr,  # likewise, in a 16-bit dtype beside fp32 rows (written when HAS_DX_NARROW)
    dweight_partial_ptr,  # (programs, n_cols) fp32: this program's sum of dy * xhat (written when PARAM_SUMS)
    dbias_partial_ptr,  # (programs, n_cols) fp32: this program's sum of dy
    dy_row_stride_vecs,  # / ALIGN, as n_col_vecs
    dsum_row_stride_vecs,
    x_row_stride_vecs,
    n_rows,
    n_col_vecs,
    rows_per_program,
    BLOCK_COLS: tl.constexpr,
    ROWS: tl.constexpr,
    RMS: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DX_NARROW: tl.constexpr,
    PARAM_SUMS: tl.constexpr,  # dweight / dbias summed here (else by _norm_param_grad_kernel)
    PREFETCH: tl.constexpr,  # the next tile's loads before this tile's sums (TILE_PREFETCH)
    ACC: tl.constexpr,
    ALIGN: tl.constexpr,
):
    dy_row_stride, dsum_row_stride = dy_row_stride_vecs * ALIGN, dsum_row_stride_vecs * ALIGN
    x_row_stride, n_cols = x_row_stride_vecs * ALIGN, n_col_vecs * ALIGN
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_COLS)
    col = cols[None, :]
    col_mask = col < n_cols
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + col, mask=col_mask, other=0.0).to(ACC)
    dweight_acc = tl.zeros([BLOCK_COLS], ACC)
    dbias_acc = tl.zeros([BLOCK_COLS], ACC)
    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    if PREFETCH:
        x_in, dy_in, mean_in, rstd_in = _load_backward_rows(x_ptr, dy_ptr, mean_ptr, rstd_ptr, first, last, col,
                                                            col_mask, x_row_stride, dy_row_stride, ROWS, RMS)
    for start in range(first, last, ROWS):
        rows = start + tl.arange(0, ROWS)
        row = rows[:, None]
        row_mask = rows < last
        mask = row_mask[:, None] & col_mask
        if PREFETCH:  # this tile's loads were issued last iteration; the next tile's go out now
            x, dy, mean, rstd = x_in, dy_in, mean_in, rstd_in
            x_in, dy_in, mean_in, rstd_in = _load_backward_rows(x_ptr, dy_ptr, mean_ptr, rstd_ptr, start + ROWS,
                                                                last, col, col_mask, x_row_stride, dy_row_stride,
                                                                ROWS, RMS)
        else:
            x, dy, mean, rstd = _load_backward_rows(x_ptr, dy_ptr, mean_ptr, rstd_ptr, start, last, col, col_mask,
                                                    x_row_stride, dy_row_stride, ROWS, RMS)
        x, dy = x.to(ACC), dy.to(ACC)
        rstd = rstd.to(ACC)[:, None]
        if RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - mean.to(ACC)[:, None]) * rstd, 0.0)
        if HAS_WEIGHT:
            g = dy * w
        else:
            g = dy
        c1 = tl.sum(g * xhat, axis=1)[:, None] / n_cols
        if RMS:
            dx = (g - xhat * c1) * rstd
        else:
            c2 = tl.sum(g, axis=1)[:, None] / n_cols
            dx = (g - c2 - xhat * c1) * rstd
        if HAS_DSUM:
            dx += tl.load(dsum_ptr + row * dsum_row_stride + col, mask=mask, other=0.0).to(ACC)
        out_offsets = row * n_cols + col  # dx's rows, and dx_narrow's: contiguous
        if HAS_DX_NARROW:  # stored first: after dx, the unaligned tile spilled a register at 16 warps
            tl.store(dx_narrow_ptr + out_offsets, dx.to(dx_narrow_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + out_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_WEIGHT and PARAM_SUMS:
            dweight_acc += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS and PARAM_SUMS:
            dbias_acc += tl.sum(dy, axis=0)
    if HAS_WEIGHT and PARAM_SUMS:
        tl.store(dweight_partial_ptr + pid * n_cols + cols, dweight_acc, mask=cols < n_cols)
    if HAS_BIAS and PARAM_SUMS:
        tl.store(dbias_partial_ptr + pid * n_cols + cols, dbias_acc, mask=cols < n_cols)


@tuned_num_warps(4, key=["BLOCK_COLS", "ROWS"], live_tiles=2)
@triton.jit
def _sum_partial_rows_kernel(
    dweight_partial_ptr,  # (n_partial_rows, n_cols) contiguous, ACC (read when HAS_WEIGHT)
    dbias_partial_ptr,  # likewise (read when HAS_BIAS)
    dweight_ptr,  # (n_cols,): the column sums, in this pointer's dtype
    dbias_ptr,
    n_partial_rows,
    n_col_vecs,  # / ALIGN, as in the other kernels
    BLOCK_COLS: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """Stage 2: the program's BLOCK_COLS columns of both partial buffers summed over their
    rows, ROWS at a time into per-lane sums, then across the lanes: a fixed order."""
    n_cols = n_col_vecs * ALIGN
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col = cols[None, :]
    dweight_acc = tl.zeros([ROWS, BLOCK_COLS], ACC)
    dbias_acc = tl.zeros([ROWS, BLOCK_COLS], ACC)
    for start in range(0, n_partial_rows, ROWS):
        row = (start + tl.arange(0, ROWS))[:, None]
        mask = (row < n_partial_rows) & (col < n_cols)
        offsets = row.to(tl.int64) * n_cols + col
        if HAS_WEIGHT:
            dweight_acc += tl.load(dweight_partial_ptr + offsets, mask=mask, other=0.0)
        if HAS_BIAS:
            dbias_acc += tl.load(dbias_partial_ptr + offsets, mask=mask, other=0.0)
    if HAS_WEIGHT:
        tl.store(dweight_ptr + cols, tl.sum(dweight_acc, axis=0).to(dweight_ptr.dtype.element_ty), mask=cols < n_cols)
    if HAS_BIAS:
        tl.store(dbias_ptr + cols, tl.sum(dbias_acc, axis=0).to(dbias_ptr.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def _xhat_and_g(x_row, dy_row, weight_ptr, cols, mask, mean, rstd, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """A chunk of one row: (xhat, g = dy * weight), 0 where masked off."""
    xhat = tl.where(mask, (tl.load(x_row + cols, mask=mask, other=0.0).to(ACC) - mean) * rstd, 0.0)
    g = tl.load(dy_row + cols, mask=mask, other=0.0).to(ACC)
    if HAS_WEIGHT:
        g *= tl.load(weight_ptr + cols, mask=mask, other=0.0).to(ACC)
    return xhat, g


@triton.jit
def _norm_backward_dx_row(dy_ptr, dsum_ptr, x_ptr, weight_ptr, mean_ptr, rstd_ptr, dx_ptr, dx_narrow_ptr, row,
                          dy_row_stride, dsum_row_stride, x_row_stride, n_cols, BLOCK_COLS: tl.constexpr,
                          RMS: tl.constexpr, HAS_DSUM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                          HAS_DX_NARROW: tl.constexpr, ACC: tl.constexpr):
    """dx of one row too long for registers, `row` (int64), in two sweeps (the second's reads
    from L2 when few rows are in flight); dweight / dbias are _norm_param_grad_kernel's."""
    x_row = x_ptr + row * x_row_stride
    dy_row = dy_ptr + row * dy_row_stride
    rstd = tl.load(rstd_ptr + row).to(ACC)
    if RMS:
        mean = 0.0
    else:
        mean = tl.load(mean_ptr + row).to(ACC)
    # sweep 1: mean(g * xhat) and mean(g)
    acc_gx = tl.zeros([BLOCK_COLS], ACC)
    acc_g = tl.zeros([BLOCK_COLS], ACC)
    for start in range(0, n_cols, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        mask = cols < n_cols
        xhat, g = _xhat_and_g(x_row, dy_row, weight_ptr, cols, mask, mean, rstd, HAS_WEIGHT, ACC)
        acc_gx += g * xhat
        acc_g += g
    c1 = tl.sum(acc_gx, axis=0) / n_cols
    c2 = tl.sum(acc_g, axis=0) / n_cols
    # sweep 2: dx
    for start in range(0, n_cols, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        mask = cols < n_cols
        xhat, g = _xhat_and_g(x_row, dy_row, weight_ptr, cols, mask, mean, rstd, HAS_WEIGHT, ACC)
        if RMS:
            dx = (g - xhat * c1) * rstd
        else:
            dx = (g - c2 - xhat * c1) * rstd
        if HAS_DSUM:
            dx += tl.load(dsum_ptr + row * dsum_row_stride + cols, mask=mask, other=0.0).to(ACC)
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DX_NARROW:
            tl.store(dx_narrow_ptr + row * n_cols + cols, dx.to(dx_narrow_ptr.dtype.element_ty), mask=mask)


# live_tiles: sweep 1 holds two accumulators beside x, dy and the weight's chunk; at 4 (8 warps
# offered at 4096 columns) ptxas spilled 8 bytes a thread in the bf16 layer_norm variants
@tuned_num_warps(8, 4, 16, key=["BLOCK_COLS", "ROW_LOOP"], live_tiles=5)
@triton.jit
def _norm_backward_loop_kernel(
    dy_ptr, dsum_ptr, x_ptr, weight_ptr, mean_ptr, rstd_ptr, dx_ptr, dx_narrow_ptr,
    dy_row_stride_vecs, dsum_row_stride_vecs, x_row_stride_vecs, n_rows, n_col_vecs,
    BLOCK_COLS: tl.constexpr,
    RMS: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DX_NARROW: tl.constexpr,
    ACC: tl.constexpr,
    ALIGN: tl.constexpr,
    ROW_LOOP: tl.constexpr,  # as the forward loop kernel's
):
    dy_row_stride, dsum_row_stride = dy_row_stride_vecs * ALIGN, dsum_row_stride_vecs * ALIGN
    x_row_stride, n_cols = x_row_stride_vecs * ALIGN, n_col_vecs * ALIGN
    if ROW_LOOP:
        for program_row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
            row = tl.cast(program_row, tl.int64)  # a Python int under the interpreter: no .to()
            _norm_backward_dx_row(dy_ptr, dsum_ptr, x_ptr, weight_ptr, mean_ptr, rstd_ptr, dx_ptr, dx_narrow_ptr, row,
                                  dy_row_stride, dsum_row_stride, x_row_stride, n_cols, BLOCK_COLS, RMS, HAS_DSUM,
                                  HAS_WEIGHT, HAS_DX_NARROW, ACC)
    else:
        _norm_backward_dx_row(dy_ptr, dsum_ptr, x_ptr, weight_ptr, mean_ptr, rstd_ptr, dx_ptr, dx_narrow_ptr,
                              tl.program_id(0).to(tl.int64), dy_row_stride, dsum_row_stride, x_row_stride, n_cols,
                              BLOCK_COLS, RMS, HAS_DSUM, HAS_WEIGHT, HAS_DX_NARROW, ACC)


@tuned_num_warps(8, 16, key=["BLOCK_COLS", "ROWS"], live_tiles=4)
@triton.jit
def _norm_param_grad_kernel(
    dy_ptr, x_ptr, mean_ptr, rstd_ptr,
    dweight_partial_ptr,  # (row blocks, n_cols) ACC: row `block` is this program's sum of dy * xhat
    dbias_partial_ptr,  # likewise, of dy
    dy_row_stride_vecs, x_row_stride_vecs, n_rows, n_col_vecs, rows_per_block,
    BLOCK_COLS: tl.constexpr,
    ROWS: tl.constexpr,
    RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """Stage 1 of dweight / dbias for rows too long for registers: program (c, b) sums
    BLOCK_COLS columns (block c) over rows_per_block rows (block b), ROWS rows at a time
    into per-lane sums, then across the lanes, and writes partial row b of those columns."""
    dy_row_stride, x_row_stride = dy_row_stride_vecs * ALIGN, x_row_stride_vecs * ALIGN
    n_cols = n_col_vecs * ALIGN
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col = cols[None, :]
    block = tl.program_id(1)
    first = block.to(tl.int64) * rows_per_block
    last = tl.minimum(first + rows_per_block, n_rows)
    dweight_acc = tl.zeros([ROWS, BLOCK_COLS], ACC)
    dbias_acc = tl.zeros([ROWS, BLOCK_COLS], ACC)
    for start in range(first, last, ROWS):
        rows = start + tl.arange(0, ROWS)
        row_mask = rows < last
        row = rows[:, None]
        mask = row_mask[:, None] & (col < n_cols)
        dy = tl.load(dy_ptr + row * dy_row_stride + col, mask=mask, other=0.0).to(ACC)
        if HAS_WEIGHT:
            x = tl.load(x_ptr + row * x_row_stride + col, mask=mask, other=0.0).to(ACC)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0).to(ACC)[:, None]
            if RMS:
                xhat = x * rstd
            else:
                mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0).to(ACC)[:, None]
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            dweight_acc += dy * xhat
        if HAS_BIAS:
            dbias_acc += dy
    if HAS_WEIGHT:
        tl.store(dweight_partial_ptr + block * n_cols + cols, tl.sum(dweight_acc, axis=0), mask=cols < n_cols)
    if HAS_BIAS:
        tl.store(dbias_partial_ptr + block * n_cols + cols, tl.sum(dbias_acc, axis=0), mask=cols < n_cols)


# ---------------------------------------------------------------------------------
# launchers: (rows, cols) tensors whose last dim is contiguous; None for absent operands
# ---------------------------------------------------------------------------------
def norm_forward(x, residual, weight, bias, eps: float, rms: bool, out_dtype=None):
    """-> (y, x + residual or None, mean or None (RMS), rstd); y in out_dtype (None: the sum's).
    A residual of another dtype (a 16-bit one beside fp32: fuses_promotion) is read as it is,
    the sum rounded to the promoted dtype, as torch's add; row lengths and strides are then
    counted in the narrower dtype's elements."""
    n_rows, n_cols = x.shape
    sum_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    narrow = x.dtype if residual is None or residual.dtype.itemsize >= x.dtype.itemsize else residual.dtype
    y = empty_output((n_rows, n_cols), out_dtype or sum_dtype, x.device)
    h = empty_output((n_rows, n_cols), sum_dtype, x.device) if residual is not None else None
    mean = None if rms else empty_output((n_rows,), stats_dtype(sum_dtype), x.device)
    rstd = empty_output((n_rows,), stats_dtype(sum_dtype), x.device)
    if x.numel() == 0:
        return y, h, mean, rstd
    operands = dict(
        residual_ptr=residual if residual is not None else x,  # placeholders are never read
        weight_ptr=weight if weight is not None else x,
        bias_ptr=bias if bias is not None else x,
        sum_ptr=h if h is not None else y,
        mean_ptr=mean if mean is not None else rstd,
    )
    flags = dict(RMS=rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
                 HAS_BIAS=bias is not None, ACC=accumulator_dtype(sum_dtype))
    residual_stride = residual.stride(0) if residual is not None else 0
    align = row_alignment(narrow, n_cols, x.stride(0), residual_stride)
    lengths = dict(x_row_stride_vecs=x.stride(0) // align, residual_row_stride_vecs=residual_stride // align,
                   n_col_vecs=n_cols // align, ALIGN=align)
    if n_cols <= FORWARD_TILE_MAX_COLS:
        block_cols, rows = tile_shape(n_cols, TILE_ELEMENTS)
        with on_device(x):
            _norm_forward_tile_kernel[(cdiv(n_rows, rows),)](
                x_ptr=x, y_ptr=y, rstd_ptr=rstd, n_rows=n_rows, eps=eps, BLOCK_COLS=block_cols, ROWS=rows,
                **lengths, **operands, **flags)
    else:
        with on_device(x):
            programs = loop_programs(n_rows, x.device, LOOP_PROGRAMS_PER_SM)
            _norm_forward_loop_kernel[(programs,)](
                x_ptr=x, y_ptr=y, rstd_ptr=rstd, n_rows=n_rows, eps=eps, BLOCK_COLS=LOOP_BLOCK_COLS,
                ROW_LOOP=programs < n_rows, **lengths, **operands, **flags)
    return y, h, mean, rstd


def _backward_programs(n_rows: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows_per_program) of the backward tile kernel: up to PROGRAMS_PER_SM an SM,
    none without rows (each program writes its partial rows whole). The interpreter counts
    2 SMs: few programs, so each walks several rows."""
    rows_per_program = max(1, cdiv(n_rows, max(1, min(n_rows, PROGRAMS_PER_SM * sm_count(device)))))
    return max(1, cdiv(n_rows, rows_per_program)), rows_per_program


def _param_grad_row_blocks(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int]:
    """(row blocks, rows_per_block) of _norm_param_grad_kernel: enough blocks for about
    PARAM_PROGRAMS_PER_SM programs an SM over all the column blocks, each a whole number
    of PARAM_ROWS rows, none without rows (each writes its partial rows whole)."""
    col_blocks = max(1, cdiv(n_cols, PARAM_BLOCK_COLS))
    wanted = max(1, min(cdiv(PARAM_PROGRAMS_PER_SM * sm_count(device), col_blocks), cdiv(n_rows, PARAM_ROWS)))
    rows_per_block = max(1, cdiv(cdiv(n_rows, wanted), PARAM_ROWS)) * PARAM_ROWS
    return max(1, cdiv(n_rows, rows_per_block)), rows_per_block


def norm_backward(dy, dsum, x, weight, mean, rstd, has_bias: bool, rms: bool, narrow_dtype=None):
    """-> (dx, dweight or None, dbias or None, dx in narrow_dtype or None); dx in x's dtype (dy
    in x's or in y's, the statistics' dtype after an out_dtype forward), dweight in weight's
    dtype, dbias in the statistics' dtype (fp32; the caller casts it to the bias's).
    narrow_dtype: fp16 / bf16 beside fp32 rows (the sum of a 16-bit x and an fp32 residual):
    dx also stored rounded to it, the 16-bit input's gradient, from the same registers, when
    the rows move in 16-byte vectors; else cast after (one element a load and store, the tile
    spilled registers at 16 warps holding both stores' addresses)."""
    n_rows, n_cols = x.shape
    if narrow_dtype is not None and not fuses_cast(narrow_dtype, x.dtype):
        raise ValueError(f"fastdl.layer_norm_backward (triton): narrow_dtype must be float16 or bfloat16 beside "
                         f"float32 rows, got {narrow_dtype} beside {x.dtype}")
    dx = empty_output((n_rows, n_cols), x.dtype, x.device)
    dx_narrow = None
    tiled = n_cols <= BACKWARD_TILE_MAX_COLS
    # dweight / dbias's stage 1: in the tile kernel's programs, or a kernel of their own
    param_sums_in_tile = tiled and TILE_PARAM_SUMS
    block_cols, rows = tile_shape(n_cols, TILE_ELEMENTS)
    if param_sums_in_tile:
        programs, rows_per_program = _backward_programs(n_rows, x.device)
        partial_rows = programs
    else:
        programs, rows_per_program = max(1, cdiv(n_rows, rows)), rows  # tiles: no loop, as the forward's
        partial_rows, rows_per_block = _param_grad_row_blocks(n_rows, n_cols, x.device)
    acc_dtype = stats_dtype(x.dtype)
    # Every program writes its partial rows whole, and the kernels never read what they have
    # not written: a launch run again (Triton's autotuner times each choice on these
    # tensors) gives the same sums. Only an empty input's partials (no kernel runs) are zeros.
    new_partial = empty_output if x.numel() > 0 else torch.zeros
    shape = (partial_rows, n_cols)
    dweight_partial = new_partial(shape, dtype=acc_dtype, device=x.device) if weight is not None else None
    dbias_partial = new_partial(shape, dtype=acc_dtype, device=x.device) if has_bias else None
    if x.numel() > 0:
        dsum_stride = dsum.stride(0) if dsum is not None else 0
        align = row_alignment(x.dtype, n_cols, dy.stride(0), dsum_stride, x.stride(0))
        if narrow_dtype is not None and align == 16 // x.element_size():
            dx_narrow = empty_output((n_rows, n_cols), narrow_dtype, x.device)
        operands = dict(
            dsum_ptr=dsum if dsum is not None else dy,
            weight_ptr=weight if weight is not None else dy,
            mean_ptr=mean if mean is not None else rstd,
            dx_narrow_ptr=dx_narrow if dx_narrow is not None else dx,
        )
        partials = dict(dweight_partial_ptr=dweight_partial if dweight_partial is not None else rstd,
                        dbias_partial_ptr=dbias_partial if dbias_partial is not None else rstd)
        flags = dict(RMS=rms, HAS_DSUM=dsum is not None, HAS_WEIGHT=weight is not None,
                     HAS_DX_NARROW=dx_narrow is not None, ACC=accumulator_dtype(x.dtype))
        lengths = dict(dy_row_stride_vecs=dy.stride(0) // align, dsum_row_stride_vecs=dsum_stride // align,
                       x_row_stride_vecs=x.stride(0) // align, n_col_vecs=n_cols // align, ALIGN=align)
        with on_device(x):
            if tiled:
                _norm_backward_tile_kernel[(programs,)](
                    dy_ptr=dy, x_ptr=x, rstd_ptr=rstd, dx_ptr=dx, n_rows=n_rows, rows_per_program=rows_per_program,
                    BLOCK_COLS=block_cols, ROWS=rows, HAS_BIAS=has_bias, PARAM_SUMS=param_sums_in_tile,
                    PREFETCH=param_sums_in_tile and TILE_PREFETCH and block_cols * rows <= TILE_ELEMENTS,
                    **lengths, **operands, **partials, **flags)
            else:
                programs = loop_programs(n_rows, x.device, LOOP_PROGRAMS_PER_SM)
                _norm_backward_loop_kernel[(programs,)](
                    dy_ptr=dy, x_ptr=x, rstd_ptr=rstd, dx_ptr=dx, n_rows=n_rows, BLOCK_COLS=LOOP_BLOCK_COLS,
                    ROW_LOOP=programs < n_rows, **lengths, **operands, **flags)
            if not param_sums_in_tile and (weight is not None or has_bias):
                _norm_param_grad_kernel[(cdiv(n_cols, PARAM_BLOCK_COLS), partial_rows)](
                    dy_ptr=dy, x_ptr=x, mean_ptr=operands["mean_ptr"], rstd_ptr=rstd,
                    dy_row_stride_vecs=lengths["dy_row_stride_vecs"], x_row_stride_vecs=lengths["x_row_stride_vecs"],
                    n_rows=n_rows, n_col_vecs=lengths["n_col_vecs"], rows_per_block=rows_per_block,
                    BLOCK_COLS=PARAM_BLOCK_COLS, ROWS=PARAM_ROWS, RMS=rms, HAS_WEIGHT=weight is not None,
                    HAS_BIAS=has_bias, ACC=flags["ACC"], ALIGN=align, **partials)
    # stage 2: the partial rows, summed in a fixed order, in one launch for both
    dweight = empty_output((n_cols,), weight.dtype, x.device) if weight is not None else None
    dbias = empty_output((n_cols,), acc_dtype, x.device) if has_bias else None
    if (dweight is not None or dbias is not None) and n_cols > 0:
        align = row_alignment(acc_dtype, n_cols)  # the partial rows are n_cols apart
        with on_device(x):
            sum_block_cols = _sum_block_cols()
            _sum_partial_rows_kernel[(cdiv(n_cols, sum_block_cols),)](
                dweight_partial_ptr=dweight_partial if dweight_partial is not None else rstd,
                dbias_partial_ptr=dbias_partial if dbias_partial is not None else rstd,
                dweight_ptr=dweight if dweight is not None else rstd, dbias_ptr=dbias if dbias is not None else rstd,
                n_partial_rows=partial_rows, n_col_vecs=n_cols // align, BLOCK_COLS=sum_block_cols, ROWS=SUM_ROWS,
                HAS_WEIGHT=dweight is not None, HAS_BIAS=dbias is not None, ACC=accumulator_dtype(x.dtype),
                ALIGN=align)
    if narrow_dtype is not None and dx_narrow is None:  # not fused (above)
        dx_narrow = dx.to(narrow_dtype)
    return dx, dweight, dbias, dx_narrow
