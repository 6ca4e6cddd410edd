"""Run every GPU kernel once on awkward shapes, for compute-sanitizer (gpu_check.sh).

Odd sizes, one column, misaligned row starts (16-byte loads must not be taken),
strided rows, both kernel shapes of each backend; small so that the sanitizer,
which slows kernels down a hundredfold, finishes in seconds.
"""
import os

import torch

import fastdl
from fastdl.bench.tune import CUDA_TILE_KERNELS
from fastdl.triton import layer_norm as triton_norm
from fastdl.triton import softmax as triton_softmax

assert torch.cuda.is_available(), "needs a GPU"
# the first H200 run printed no progress line in 50 s under either tool: this one tells a slow
# start-up (torch, CUDA under the sanitizer) from slow kernels
torch.ones(1, device="cuda")
print(f"sanitize_kernels: torch {torch.__version__} and CUDA ready", flush=True)
dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
count = 0
# The shapes below run the tiles and the tiles' own dweight / dbias sums (knobs at 0) where the
# CUDA launchers' defaults take the packed kernels and norm_param_grad_kernel for 16-bit rows
# past 2048 columns; the passes further down set each knob to 1 for those.
os.environ.update(CUDA_TILE_KERNELS)


TRITON_SPLIT = triton_softmax.SPLIT_PROGRAMS_PER_SM


def long_rows_split(on):
    """Few long rows split across programs / blocks (the default), or one a row."""
    triton_softmax.SPLIT_PROGRAMS_PER_SM = TRITON_SPLIT if on else 0
    if on:
        os.environ.pop("FASTDL_CUDA_SPLIT_PER_SM", None)
    else:
        os.environ["FASTDL_CUDA_SPLIT_PER_SM"] = "0"


def softmax_calls(dtype):
    global count
    # a shape for each tile (warp x 8 / x 16 values, 128, 512, 1024 threads) and the long rows' kernels: split
    # across programs / blocks (the default for so few rows), then one program / block a row
    tiles = [(1, 1), (37, 300), (5, 1000), (2, 1025), (3, 4097), (2, 9000)]
    # contiguous 20000 / 40000: the packed kernel (rows in registers) when not split
    long_rows = [(2, 16385), (1, 70000), (2, 20000), (2, 40000)]
    for split in (True, False):
        long_rows_split(split)
        for rows, cols in (tiles if split else []) + long_rows:
            base = torch.randn(rows, cols + 1, device="cuda", dtype=dtype)
            # row stride cols+1 (the second view starts misaligned); then contiguous: odd widths
            # (16385, 1025) leave rows off 16-byte boundaries alike, which the long rows' kernels peel
            for x in (base[:, :cols], base[:, 1:], base[:, :cols].contiguous()):
                for log in (False, True):
                    y = (fastdl.ops.log_softmax if log else fastdl.ops.softmax)(x, -1)
                    fastdl.ops.softmax_backward(torch.randn_like(y), y, -1, log)
                    count += 2
    # long rows in fewer programs / blocks than rows, each walking rows (Triton's LOOP_PROGRAMS_PER_SM,
    # FASTDL_CUDA_LOOP_BLOCKS_PER_SM; the block kernels, not the packed ones): aligned and odd widths
    long_rows_split(False)
    triton_softmax.LOOP_PROGRAMS_PER_SM = 1
    os.environ.update(FASTDL_CUDA_LOOP_BLOCKS_PER_SM="1", FASTDL_CUDA_PACKED_ROWS="0")
    for cols in (16392, 16385):
        x = torch.randn(torch.cuda.get_device_properties(0).multi_processor_count + 5, cols, device="cuda",
                        dtype=dtype)
        for log in (False, True):
            y = (fastdl.ops.log_softmax if log else fastdl.ops.softmax)(x, -1)
            fastdl.ops.softmax_backward(torch.randn_like(y), y, -1, log)
            count += 2
    triton_softmax.LOOP_PROGRAMS_PER_SM = 0
    os.environ.pop("FASTDL_CUDA_LOOP_BLOCKS_PER_SM")
    os.environ.pop("FASTDL_CUDA_PACKED_ROWS")
    long_rows_split(True)
    if fastdl.get_backend() == "cuda" and dtype != torch.float64:
        # rows of the tiles' lengths by the packed kernels (FASTDL_CUDA_PACKED_TILES=1, 128 / 256 / 512
        # threads): aligned, and contiguous odd widths (their ragged columns held beside)
        os.environ["FASTDL_CUDA_PACKED_TILES"] = "1"
        for cols in (2056, 4097, 8200, 16383):
            for log in (False, True):
                x = torch.randn(3, cols, device="cuda", dtype=dtype)
                y = (fastdl.ops.log_softmax if log else fastdl.ops.softmax)(x, -1)
                fastdl.ops.softmax_backward(torch.randn_like(y), y, -1, log)
                count += 2
        os.environ["FASTDL_CUDA_PACKED_TILES"] = "0"


def norm_calls(dtype):
    global count
    # a shape for each tile forward and backward, the loop kernels, and many rows a block
    for rows, cols in [(1, 1), (3, 7), (37, 300), (5, 1000), (3, 2049), (2, 8193), (1, 12000), (1, 20000),
                       (300, 33)]:
        base = torch.randn(rows, cols + 1, device="cuda", dtype=dtype)
        x = base[:, 1:].requires_grad_()
        res = torch.randn(rows, cols, device="cuda", dtype=dtype, requires_grad=True)
        # parameters in fp32 (mixed precision) and, for 16-bit x, in x's dtype (read as they are)
        for param_dtype in dict.fromkeys((torch.float32, dtype)):
            w = torch.rand(cols, device="cuda", dtype=param_dtype, requires_grad=True)
            b = torch.randn(cols, device="cuda", dtype=param_dtype, requires_grad=True)
            h, y = fastdl.ops.add_layer_norm(x, res, cols, w, b)
            torch.autograd.grad((h, y), (x, res, w, b), (torch.randn_like(h), torch.randn_like(y)))
            count += 2
        y = fastdl.ops.rms_norm(x, cols)
        torch.autograd.grad(y, x, torch.randn_like(y))
        count += 2
        n = cols // 8 * 8 + 8  # whole 16-byte vectors: 2056 (128 threads), 8200 (512), 12008, 20008 (loop)
        packed_rows = dtype in (torch.float16, torch.bfloat16) and n <= 16384 and cols > 2048
        if packed_rows and fastdl.get_backend() == "cuda":
            # the CUDA packed forward (FASTDL_CUDA_PACKED_NORM=1), on rows it takes: aligned,
            # contiguous; parameters in fp32 and in x's dtype (the other backends read no knob)
            os.environ["FASTDL_CUDA_PACKED_NORM"] = "1"
            aligned = torch.randn(rows, n, device="cuda", dtype=dtype)
            for param_dtype in (torch.float32, dtype):
                fastdl.ops.layer_norm(aligned, n, torch.rand(n, device="cuda", dtype=param_dtype),
                                      torch.randn(n, device="cuda", dtype=param_dtype))
            fastdl.ops.rms_norm(aligned, n)
            os.environ["FASTDL_CUDA_PACKED_NORM"] = "0"
            count += 3
        param_kernel_cols = 4096 if dtype == torch.float64 else 16384 if dtype.itemsize == 2 else 8192
        if fastdl.get_backend() == "cuda" and n <= param_kernel_cols:
            # the CUDA backward writing dx alone (the tile, packed or loop kernel) and
            # norm_param_grad_kernel's dweight / dbias (FASTDL_CUDA_NORM_PARAM_KERNEL=1), on rows off
            # 16-byte boundaries (x) and on them (16-bit from 2049 columns: the packed backward)
            os.environ["FASTDL_CUDA_NORM_PARAM_KERNEL"] = "1"
            for rows_in in (x, torch.randn(rows, n, device="cuda", dtype=dtype, requires_grad=True)):
                width = rows_in.shape[1]
                w = torch.rand(width, device="cuda", requires_grad=True)
                b = torch.randn(width, device="cuda", requires_grad=True)
                y = fastdl.ops.layer_norm(rows_in, width, w, b)
                torch.autograd.grad(y, (rows_in, w, b), torch.randn_like(y))
                count += 2
            os.environ["FASTDL_CUDA_NORM_PARAM_KERNEL"] = "0"
    if fastdl.get_backend() in ("triton", "cuda"):
        # the loop kernels in fewer programs (blocks) than rows, each walking rows (Triton's
        # LOOP_PROGRAMS_PER_SM: the fused norm forward past 16384 columns and its dx past 8192;
        # FASTDL_CUDA_LOOP_BLOCKS_PER_SM: the forward past 16384), aligned and not
        triton_norm.LOOP_PROGRAMS_PER_SM = 1
        os.environ["FASTDL_CUDA_LOOP_BLOCKS_PER_SM"] = "1"
        for cols in (16392, 16385):
            rows = torch.cuda.get_device_properties(0).multi_processor_count + 5
            x, res = (torch.randn(rows, cols, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
            w = torch.rand(cols, device="cuda", requires_grad=True)
            h, y = fastdl.ops.add_layer_norm(x, res, cols, w)
            torch.autograd.grad((h, y), (x, res, w), (torch.randn_like(h), torch.randn_like(y)))
            count += 2
        triton_norm.LOOP_PROGRAMS_PER_SM = 0
        os.environ.pop("FASTDL_CUDA_LOOP_BLOCKS_PER_SM")


# FASTDL_SANITIZE_BACKENDS (comma-separated: gpu_check.sh runs one process a backend) or every
# fastdl backend on CUDA; the CUDA C++ kernels first: they need no JIT compile, so a run cut off
# early has checked them
wanted = os.environ.get("FASTDL_SANITIZE_BACKENDS", "").split(",")
backends = [b for b in fastdl.available_backends("cuda") if b != "torch" and (wanted == [""] or b in wanted)]
assert backends, f"no backend to sanitize: FASTDL_SANITIZE_BACKENDS={wanted}, here {fastdl.available_backends('cuda')}"
for backend in sorted(backends, key=lambda b: b != "cuda"):
    with fastdl.use_backend(backend):
        for dtype in dtypes:
            softmax_calls(dtype)
            norm_calls(dtype)
            torch.cuda.synchronize()
            # progress, so that a run cut off by gpu_check.sh's timeout says what it covered
            print(f"sanitize_kernels: {backend} {dtype} done ({count} calls so far)", flush=True)
print(f"sanitize_kernels: ran {count} kernel calls")
