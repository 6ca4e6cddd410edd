"""softmax / log_softmax over the rows of a (rows, cols) tensor: Triton kernels.

Forward, two kernels by row length:
  * one pass ("tile"): a program loads ROWS whole rows into registers, reduces max and
    sum there and writes the result: each element is read once and written once, the
    minimum traffic. Used while a row fits on chip (cols <= SINGLE_PASS_MAX_COLS).
  * online ("loop"): for longer rows, one program per row walks it in BLOCK_COLS
    chunks keeping a running max m and a running sum s, rescaling s whenever m grows
    (s <- s * exp(m_old - m_new) + sum exp(x - m_new); Milakov & Gimelshein 2018,
    "Online normalizer calculation for softmax"), then a second sweep writes the
    output. That second read usually hits L2, which holds the row just read.
Backward likewise, with y the forward output and dy the incoming gradient:
  softmax:      dx = y * (dy - sum(dy * y))
  log_softmax:  dx = dy - exp(y) * sum(dy)
All arithmetic in fp32 (fp64 for fp64 tensors); loads and stores in the tensor's dtype.

Autotuning (num_warps) is keyed on the tile shape, not the exact row length, so a
model whose lengths vary tunes once per power of two. It runs on the first call of
each shape: warm up before capturing a CUDA graph.
"""
import torch
import triton
import triton.language as tl

from fastdl._outputs import empty_output
from fastdl.triton._launch import accumulator_dtype, autotune_configs, on_device, tile_shape

# Longest row kept whole in registers by the one-pass kernels (16k fp32 = 64 KiB a row).
SINGLE_PASS_MAX_COLS = 16384
# Chunk of a long row per loop iteration of the online kernels.
LOOP_BLOCK_COLS = 4096
# Elements one program of the tile kernels aims to hold (several short rows each).
TILE_ELEMENTS = 4096


# ---------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------
@triton.autotune(configs=autotune_configs(4, 8, 16), key=["BLOCK_COLS", "ROWS"])
@triton.jit
def _softmax_forward_tile_kernel(
    x_ptr,  # input, (n_rows, n_cols), last dim contiguous
    y_ptr,  # output, (n_rows, n_cols), contiguous
    x_row_stride,  # elements between rows of x
    n_rows,
    n_cols,
    BLOCK_COLS: tl.constexpr,  # power of two >= n_cols
    ROWS: tl.constexpr,  # rows per program
    LOG: tl.constexpr,  # log_softmax instead of softmax
    ACC: tl.constexpr,  # accumulation dtype
):
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


@triton.autotune(configs=autotune_configs(8, 4, 16), key=["BLOCK_COLS"])
@triton.jit
def _softmax_forward_loop_kernel(
    x_ptr,  # input, (n_rows, n_cols), last dim contiguous
    y_ptr,  # output, (n_rows, n_cols), contiguous
    x_row_stride,
    n_cols,
    BLOCK_COLS: tl.constexpr,  # chunk walked per iteration
    LOG: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    y_row = y_ptr + row * n_cols
    # Per-lane running max and sum; lanes combine once at the end.
    m = tl.full([BLOCK_COLS], -float("inf"), ACC)
    s = tl.zeros([BLOCK_COLS], ACC)
    for start in range(0, n_cols, BLOCK_COLS):
        col = start + tl.arange(0, BLOCK_COLS)
        x = tl.load(x_row + col, mask=col < n_cols, other=-float("inf")).to(ACC)
        m_new = tl.maximum(m, x)
        # A lane that has seen only -inf keeps m = -inf and s = 0 (exp(-inf - -inf) would
        # be NaN); a NaN in x makes m_new NaN, takes the update and poisons s, as in torch.
        s = tl.where(m_new == -float("inf"), s, s * tl.exp(m - m_new) + tl.exp(x - m_new))
        m = m_new
    row_max = tl.max(m, axis=0)
    # All -inf row: row_max = -inf, sum 0, outputs NaN below (as torch).
    row_sum = tl.sum(tl.where(m == -float("inf"), 0.0, s * tl.exp(m - row_max)), axis=0)
    log_sum = tl.log(row_sum)
    for start in range(0, n_cols, BLOCK_COLS):
        col = start + tl.arange(0, BLOCK_COLS)
        mask = col < n_cols
        x = tl.load(x_row + col, mask=mask, other=0.0).to(ACC)
        if LOG:
            y = x - row_max - log_sum
        else:
            y = tl.exp(x - row_max) / row_sum
        tl.store(y_row + col, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------
@triton.autotune(configs=autotune_configs(4, 8, 16), key=["BLOCK_COLS", "ROWS"])
@triton.jit
def _softmax_backward_tile_kernel(
    dy_ptr,  # gradient of the output, (n_rows, n_cols), last dim contiguous
    y_ptr,  # forward output, (n_rows, n_cols), last dim contiguous
    dx_ptr,  # gradient of the input, (n_rows, n_cols), contiguous
    dy_row_stride,
    y_row_stride,
    n_rows,
    n_cols,
    BLOCK_COLS: tl.constexpr,
    ROWS: tl.constexpr,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
):
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


@triton.autotune(configs=autotune_configs(8, 4, 16), key=["BLOCK_COLS"])
@triton.jit
def _softmax_backward_loop_kernel(
    dy_ptr,
    y_ptr,
    dx_ptr,
    dy_row_stride,
    y_row_stride,
    n_cols,
    BLOCK_COLS: tl.constexpr,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dy_row = dy_ptr + row * dy_row_stride
    y_row = y_ptr + row * y_row_stride
    dx_row = dx_ptr + row * n_cols
    acc = tl.zeros([BLOCK_COLS], ACC)
    for start in range(0, n_cols, BLOCK_COLS):
        col = start + tl.arange(0, BLOCK_COLS)
        mask = col < n_cols
        dy = tl.load(dy_row + col, mask=mask, other=0.0).to(ACC)
        if LOG:
            acc += dy
        else:
            acc += dy * tl.load(y_row + col, mask=mask, other=0.0).to(ACC)
    total = tl.sum(acc, axis=0)
    for start in range(0, n_cols, BLOCK_COLS):
        col = start + tl.arange(0, BLOCK_COLS)
        mask = col < n_cols
        dy = tl.load(dy_row + col, mask=mask, other=0.0).to(ACC)
        y = tl.load(y_row + col, mask=mask, other=0.0).to(ACC)
        if LOG:
            dx = dy - tl.exp(y) * total
        else:
            dx = y * (dy - total)
        tl.store(dx_row + col, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------
# launchers: 2-D (rows, cols) tensors whose last dim is contiguous
# ---------------------------------------------------------------------------------
def softmax_forward(x: torch.Tensor, log: bool) -> torch.Tensor:
    n_rows, n_cols = x.shape
    y = empty_output((n_rows, n_cols), x.dtype, x.device)
    if y.numel() == 0:
        return y
    acc = accumulator_dtype(x.dtype)
    if n_cols <= SINGLE_PASS_MAX_COLS:
        block_cols, rows = tile_shape(n_cols, TILE_ELEMENTS)
        grid = (triton.cdiv(n_rows, rows),)
        with on_device(x):
            _softmax_forward_tile_kernel[grid](
                x, y, x.stride(0), n_rows, n_cols, BLOCK_COLS=block_cols, ROWS=rows, LOG=log, ACC=acc
            )
    else:
        with on_device(x):
            _softmax_forward_loop_kernel[(n_rows,)](
                x, y, x.stride(0), n_cols, BLOCK_COLS=LOOP_BLOCK_COLS, LOG=log, ACC=acc
            )
    return y


def softmax_backward(grad_out: torch.Tensor, out: torch.Tensor, log: bool) -> torch.Tensor:
    n_rows, n_cols = out.shape
    dx = empty_output((n_rows, n_cols), out.dtype, out.device)
    if dx.numel() == 0:
        return dx
    acc = accumulator_dtype(out.dtype)
    if n_cols <= SINGLE_PASS_MAX_COLS:
        block_cols, rows = tile_shape(n_cols, TILE_ELEMENTS)
        grid = (triton.cdiv(n_rows, rows),)
        with on_device(out):
            _softmax_backward_tile_kernel[grid](
                grad_out, out, dx, grad_out.stride(0), out.stride(0), n_rows, n_cols,
                BLOCK_COLS=block_cols, ROWS=rows, LOG=log, ACC=acc,
            )
    else:
        with on_device(out):
            _softmax_backward_loop_kernel[(n_rows,)](
                grad_out, out, dx, grad_out.stride(0), out.stride(0), n_cols,
                BLOCK_COLS=LOOP_BLOCK_COLS, LOG=log, ACC=acc,
            )
    return dx
