"""The kernels the H200 runs found slow, under Nsight Compute (gpu_check.sh's step "profile").

    ncu --profile-from-start off ... python3 scripts/profile_kernels.py   # what gpu_check.sh runs
    python3 scripts/profile_kernels.py --device cpu --quick                # the cases run, no profiler

Each case is warmed up (compiles, autotuning, first allocations) outside the profiled range,
then called once inside it (cudaProfilerStart / Stop), so the profiler reports that call's
kernels alone, after a line naming the case ("profile_kernels: <op> <shape> on <backend>").
The cases, and why (benchmarks/results/h200/NOTES.md, the run at 3b332bb, bf16; % of the 4172
GB/s copy):
  * CUDA norm forward at 4096 x 16384 and 4096 x 4096 by the packed kernel (the default for
    16-bit rows since the run of 2b1309b: 88% and 66%) and by the tile (41%, 50%), beside
    Triton's (85%, 78%);
  * CUDA softmax forward at 4096 x 16384 (packed by default since 2b1309b: 67%; the tile 63%)
    beside Triton's (90%), and of a GPT-2 vocabulary, 1024 x 50257 (0.59x eager); its backward
    packed and by the tile (96%, 64%);
  * the norm backward at hidden 1024, both backends (Triton fwd+bwd 17%, CUDA 30%), and at
    16384 (Triton 30%, CUDA 44%; Triton's dweight / dbias since in a kernel of their own);
  * softmax of a GPT-2 vocabulary, 1024 x 50257, on Triton (fwd 55%, bwd 58%: its loop kernels
    read a row twice; a program a row puts all 98 MiB in flight, past the 50 MB L2) and CUDA's
    backward (60%, the packed backward since);
  * a 512 MiB copy (copy_, and an elementwise kernel) and softmax at 4096 x 65536: every
    implementation ran at 2.0-2.8 TB/s at these sizes, where 4096 x 16384 reached 4.2; and at
    4096 x 65280, rows not a power of two bytes long.
Since the third run (2b1309b): the norm forward's loop kernels at 1024 x 65536 (CUDA 351 us,
Triton 114); CUDA's softmax block kernel at 4096 x 65536 and the split of 8 x 262144 (583 GB/s,
Triton 912), which load 4 steps ahead since session 34; the fp32 norm backward at 4096 x 16384
(CUDA's loop kernel, with its sums in shared memory).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

import fastdl
from fastdl.bench.tune import Knob

BF16 = torch.bfloat16


def _softmax(shape):
    def setup(device):
        x = torch.randn(shape, device=device, dtype=BF16)
        return lambda: fastdl.ops.softmax(x, -1)
    return setup


def _softmax_backward(shape):
    def setup(device):
        y = torch.softmax(torch.randn(shape, device=device, dtype=BF16), -1)
        dy = torch.randn_like(y)
        return lambda: fastdl.ops.softmax_backward(dy, y, -1)
    return setup


def _layer_norm(shape, direction, dtype=BF16):
    def setup(device):
        n = shape[1]
        grad = direction == "fwd+bwd"
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=grad)
        w = torch.rand(n, device=device, dtype=dtype, requires_grad=grad)
        b = torch.randn(n, device=device, dtype=dtype, requires_grad=grad)
        if not grad:
            return lambda: fastdl.ops.layer_norm(x, n, w, b)
        dy = torch.randn(shape, device=device, dtype=dtype)
        return lambda: torch.autograd.grad(fastdl.ops.layer_norm(x, n, w, b), (x, w, b), dy)
    return setup


def _knob(variable, setup, value=1):
    """setup's call with the environment variable `variable` at `value` while it runs (the CUDA
    launchers read their knobs at each launch; tune.py's Knob sets and puts it back)."""
    def wrapped(device):
        call = setup(device)

        def run():
            with Knob(f"env:{variable}", [value]).set(value):
                return call()
        return run
    return wrapped


def _copy(kind, n_bytes):
    def setup(device):
        src = torch.ones(n_bytes // 4, device=device)
        dst = torch.empty_like(src)
        if kind == "copy_":
            return lambda: dst.copy_(src)
        return lambda: torch.mul(src, 1.0, out=dst)  # an elementwise kernel, not cudaMemcpy
    return setup


# (label, backend or None for torch's own, full shape, quick shape, setup(shape) -> setup(device))
CASES: list[tuple[str, str | None, tuple, tuple, Callable]] = [
    ("layer_norm fwd bf16", "cuda", (4096, 16384), (4, 1000), lambda s: _layer_norm(s, "fwd")),
    ("layer_norm fwd bf16", "triton", (4096, 16384), (4, 1000), lambda s: _layer_norm(s, "fwd")),
    ("layer_norm fwd bf16, tile", "cuda", (4096, 16384), (4, 1000),
     lambda s: _knob("FASTDL_CUDA_PACKED_NORM", _layer_norm(s, "fwd"), 0)),
    ("layer_norm fwd bf16", "cuda", (4096, 4096), (4, 300), lambda s: _layer_norm(s, "fwd")),
    ("layer_norm fwd bf16, tile", "cuda", (4096, 4096), (4, 300),
     lambda s: _knob("FASTDL_CUDA_PACKED_NORM", _layer_norm(s, "fwd"), 0)),
    ("layer_norm fwd bf16", "triton", (4096, 4096), (4, 300), lambda s: _layer_norm(s, "fwd")),
    ("softmax fwd bf16", "cuda", (4096, 16384), (4, 1000), _softmax),
    ("softmax fwd bf16", "triton", (4096, 16384), (4, 1000), _softmax),
    ("softmax fwd bf16", "cuda", (1024, 50257), (2, 2001), _softmax),
    # a vocabulary's rows: Triton's loop kernels read each row twice (does the second read hit L2, with
    # every row in flight at once? the Memory Workload section's L2 hit rate), CUDA's packed backward
    ("softmax fwd bf16", "triton", (1024, 50257), (2, 2001), _softmax),
    ("softmax bwd bf16", "triton", (1024, 50257), (2, 2001), _softmax_backward),
    ("softmax bwd bf16", "cuda", (1024, 50257), (2, 2001), _softmax_backward),
    # the tiles at lengths the packed kernels take by default (FASTDL_CUDA_PACKED_TILES=0)
    ("softmax fwd bf16, tile", "cuda", (4096, 16384), (4, 2056),
     lambda s: _knob("FASTDL_CUDA_PACKED_TILES", _softmax(s), 0)),
    ("softmax bwd bf16", "cuda", (4096, 16384), (4, 2056), _softmax_backward),
    ("softmax bwd bf16, tile", "cuda", (4096, 16384), (4, 2056),
     lambda s: _knob("FASTDL_CUDA_PACKED_TILES", _softmax_backward(s), 0)),
    ("layer_norm fwd+bwd bf16", "cuda", (4096, 1024), (4, 100), lambda s: _layer_norm(s, "fwd+bwd")),
    ("layer_norm fwd+bwd bf16", "triton", (4096, 1024), (4, 100), lambda s: _layer_norm(s, "fwd+bwd")),
    # the long-row backward: Triton's dx loop beside its dweight / dbias kernel (blocks of columns x rows), CUDA's
    ("layer_norm fwd+bwd bf16", "triton", (4096, 16384), (4, 8200), lambda s: _layer_norm(s, "fwd+bwd")),
    ("layer_norm fwd+bwd bf16", "cuda", (4096, 16384), (4, 8200), lambda s: _layer_norm(s, "fwd+bwd")),
    # the CUDA backward's dx alone (the packed kernel here) and dweight / dbias by norm_param_grad_kernel
    # (the default since the H200 tuner), beside the tile with its own sums
    ("layer_norm fwd+bwd bf16", "cuda", (4096, 8192), (4, 2056), lambda s: _layer_norm(s, "fwd+bwd")),
    ("layer_norm fwd+bwd bf16, tile sums", "cuda", (4096, 8192), (4, 2056),
     lambda s: _knob("FASTDL_CUDA_NORM_PARAM_KERNEL", _layer_norm(s, "fwd+bwd"), 0)),
    # fp32 rows past 8192 columns: the CUDA backward's loop kernel (dweight / dbias in shared memory),
    # which 16-bit rows left for the packed backward and norm_param_grad_kernel in 2b1309b's defaults
    ("layer_norm fwd+bwd fp32", "cuda", (4096, 16384), (4, 8200),
     lambda s: _layer_norm(s, "fwd+bwd", torch.float32)),
    ("layer_norm fwd+bwd fp32", "triton", (4096, 16384), (4, 8200),
     lambda s: _layer_norm(s, "fwd+bwd", torch.float32)),
    # the norm forward's loop kernels past 16384 columns (two reads of a row: is the second from L2?)
    ("layer_norm fwd bf16", "cuda", (1024, 65536), (2, 20000), lambda s: _layer_norm(s, "fwd")),
    ("layer_norm fwd bf16", "triton", (1024, 65536), (2, 20000), lambda s: _layer_norm(s, "fwd")),
    ("softmax fwd bf16", "cuda", (4096, 65536), (2, 3000), _softmax),
    ("softmax fwd bf16", "triton", (4096, 65536), (2, 3000), _softmax),
    # CUDA's block kernel there (FASTDL_CUDA_PACKED_ROWS=0; what fp32 rows past 32768 and 16-bit
    # past 65536 take), and a few rows split into chunks (two kernels): both read 4 steps ahead since
    # session 34 (for_row_pieces_ahead), untimed
    ("softmax fwd bf16, block", "cuda", (4096, 65536), (2, 3000),
     lambda s: _knob("FASTDL_CUDA_PACKED_ROWS", _softmax(s), 0)),
    ("softmax fwd bf16", "cuda", (8, 262144), (2, 3000), _softmax),
    ("softmax fwd bf16", "triton", (8, 262144), (2, 3000), _softmax),
    # rows 255 x 256 long, not a power of two (128 KiB rows: the same offset of rows a power of
    # two apart may land in the same memory channels)
    ("softmax fwd bf16", "triton", (4096, 65280), (2, 3000), _softmax),
    ("copy_, bytes:", None, (512 << 20,), (4096,), lambda s: _copy("copy_", s[0])),
    ("mul(1.0) fp32, bytes:", None, (512 << 20,), (4096,), lambda s: _copy("mul", s[0])),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy shapes (a smoke test)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    profiling = device.type == "cuda"
    ran = 0
    for label, backend, shape, quick_shape, make in CASES:
        shape = quick_shape if args.quick else shape
        name = f"{label} {'x'.join(map(str, shape))} on {backend or 'torch'}"
        if backend is not None and backend not in fastdl.available_backends(device.type):
            print(f"profile_kernels: {name}: backend {backend} not available here, skipped", flush=True)
            continue
        with fastdl.use_backend(backend or "auto"):
            call = make(shape)(device)
            for _ in range(3):  # compiles, autotuning, allocations: outside the profiled range
                call()
            if profiling:
                torch.cuda.synchronize()
            print(f"profile_kernels: {name}", flush=True)
            if profiling:
                torch.cuda.cudart().cudaProfilerStart()
            call()
            if profiling:
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStop()
        ran += 1
    print(f"profile_kernels: {ran} cases", flush=True)
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
