"""Compile every Triton kernel for an sm_90 GPU on a machine that has none.

The interpreter misses what a real compile rejects (dot shapes, unsupported casts,
register-file limits); triton.compile with a GPU target needs no GPU. Run it in a
process WITHOUT TRITON_INTERPRET (tests/test_build.py does):

    python tests/triton_compile_check.py [--arch 90]

Each op lists the (kernel, signature, constexprs, num_warps) it launches with; add a
line here when you add a kernel.
"""
import argparse
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

POINTER = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "fp64": "*fp64"}
# largest shared memory a block may use (opt-in), by compute capability
MAX_SHARED_BYTES = {80: 166912, 90: 232448}
ACC = {"fp32": tl.float32, "fp16": tl.float32, "bf16": tl.float32, "fp64": tl.float64}


def softmax_specs():
    from fastdl.triton import softmax as k

    specs = []
    tile_shapes = [(1, 4096), (32, 128), (1024, 4), (k.SINGLE_PASS_MAX_COLS, 1)]
    for dtype in POINTER:
        for log in (False, True):
            for block_cols, rows in tile_shapes if dtype == "fp32" else tile_shapes[-1:]:
                for warps in (4, 16):
                    const = dict(BLOCK_COLS=block_cols, ROWS=rows, LOG=log, ACC=ACC[dtype])
                    sig = {"x_ptr": POINTER[dtype], "y_ptr": POINTER[dtype], "x_row_stride": "i64",
                           "n_rows": "i32", "n_cols": "i32", **{c: "constexpr" for c in const}}
                    specs.append((k._softmax_forward_tile_kernel, sig, const, warps))
                    sig = {"dy_ptr": POINTER[dtype], "y_ptr": POINTER[dtype], "dx_ptr": POINTER[dtype],
                           "dy_row_stride": "i64", "y_row_stride": "i64", "n_rows": "i32", "n_cols": "i32",
                           **{c: "constexpr" for c in const}}
                    specs.append((k._softmax_backward_tile_kernel, sig, const, warps))
            const = dict(BLOCK_COLS=k.LOOP_BLOCK_COLS, LOG=log, ACC=ACC[dtype])
            sig = {"x_ptr": POINTER[dtype], "y_ptr": POINTER[dtype], "x_row_stride": "i64", "n_cols": "i32",
                   **{c: "constexpr" for c in const}}
            specs.append((k._softmax_forward_loop_kernel, sig, const, 8))
            sig = {"dy_ptr": POINTER[dtype], "y_ptr": POINTER[dtype], "dx_ptr": POINTER[dtype],
                   "dy_row_stride": "i64", "y_row_stride": "i64", "n_cols": "i32", **{c: "constexpr" for c in const}}
            specs.append((k._softmax_backward_loop_kernel, sig, const, 8))
            # split rows: (max, sum) / dot per chunk, then the write; up to 1024 chunks a row
            stat = "*fp64" if dtype == "fp64" else "*fp32"
            chunk_args = {"n_cols": "i32", "chunk_cols": "i32", "n_chunks": "i32"}
            const = dict(BLOCK_COLS=k.LOOP_BLOCK_COLS, ACC=ACC[dtype])
            sig = {"x_ptr": POINTER[dtype], "max_ptr": stat, "sum_ptr": stat, "x_row_stride": "i64", **chunk_args,
                   **{c: "constexpr" for c in const}}
            if not log:
                specs.append((k._softmax_chunk_stats_kernel, sig, const, 8))
            const = dict(BLOCK_COLS=k.LOOP_BLOCK_COLS, LOG=log, ACC=ACC[dtype])
            sig = {"dy_ptr": POINTER[dtype], "y_ptr": POINTER[dtype], "dot_ptr": stat, "dy_row_stride": "i64",
                   "y_row_stride": "i64", **chunk_args, **{c: "constexpr" for c in const}}
            specs.append((k._softmax_backward_chunk_dot_kernel, sig, const, 8))
            for block_chunks in (2, 1024):
                const = dict(BLOCK_COLS=k.LOOP_BLOCK_COLS, BLOCK_CHUNKS=block_chunks, LOG=log, ACC=ACC[dtype])
                sig = {"x_ptr": POINTER[dtype], "y_ptr": POINTER[dtype], "max_ptr": stat, "sum_ptr": stat,
                       "x_row_stride": "i64", **chunk_args, **{c: "constexpr" for c in const}}
                specs.append((k._softmax_chunk_write_kernel, sig, const, 8))
                sig = {"dy_ptr": POINTER[dtype], "y_ptr": POINTER[dtype], "dx_ptr": POINTER[dtype], "dot_ptr": stat,
                       "dy_row_stride": "i64", "y_row_stride": "i64", **chunk_args, **{c: "constexpr" for c in const}}
                specs.append((k._softmax_backward_chunk_write_kernel, sig, const, 8))
    return specs


def layer_norm_specs():
    from fastdl.triton import layer_norm as k

    specs = []
    variants = [  # (RMS, residual/dsum, weight, bias)
        (False, False, True, True), (False, True, True, True), (True, False, True, False),
        (True, True, True, False), (False, False, False, False)]
    for dtype in POINTER:
        p = POINTER[dtype]
        for rms, fused, has_w, has_b in variants if dtype == "fp32" else variants[:2]:
            flags = dict(RMS=rms, HAS_WEIGHT=has_w, HAS_BIAS=has_b, ACC=ACC[dtype])
            stat = "*fp64" if dtype == "fp64" else "*fp32"
            fwd_ptrs = {"x_ptr": p, "residual_ptr": p, "weight_ptr": "*fp32", "bias_ptr": "*fp32", "y_ptr": p,
                        "sum_ptr": p, "mean_ptr": stat, "rstd_ptr": stat}
            bwd_ptrs = {"dy_ptr": p, "dsum_ptr": p, "x_ptr": p, "weight_ptr": "*fp32", "mean_ptr": stat,
                        "rstd_ptr": stat, "dx_ptr": p, "dweight_partial_ptr": stat, "dbias_partial_ptr": stat}
            for block_cols, rows in [(1024, 4), (k.FORWARD_TILE_MAX_COLS, 1)]:
                const = dict(BLOCK_COLS=block_cols, ROWS=rows, HAS_RESIDUAL=fused, **flags)
                sig = {**fwd_ptrs, "x_row_stride": "i64", "residual_row_stride": "i64", "n_rows": "i32",
                       "n_cols": "i32", "eps": "fp32", **{c: "constexpr" for c in const}}
                specs.append((k._norm_forward_tile_kernel, sig, const, 8))
            for block_cols, rows in [(1024, 4), (k.BACKWARD_TILE_MAX_COLS, 1)]:
                const = dict(BLOCK_COLS=block_cols, ROWS=rows, HAS_DSUM=fused, **flags)
                sig = {**bwd_ptrs, "dy_row_stride": "i64", "dsum_row_stride": "i64", "x_row_stride": "i64",
                       "n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32", **{c: "constexpr" for c in const}}
                specs.append((k._norm_backward_tile_kernel, sig, const, 8))
            const = dict(BLOCK_COLS=k.LOOP_BLOCK_COLS, HAS_RESIDUAL=fused, **flags)
            sig = {**fwd_ptrs, "x_row_stride": "i64", "residual_row_stride": "i64", "n_cols": "i32", "eps": "fp32",
                   **{c: "constexpr" for c in const}}
            specs.append((k._norm_forward_loop_kernel, sig, const, 8))
            const = dict(BLOCK_COLS=k.LOOP_BLOCK_COLS, HAS_DSUM=fused, **flags)
            sig = {**bwd_ptrs, "dy_row_stride": "i64", "dsum_row_stride": "i64", "x_row_stride": "i64",
                   "n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32", **{c: "constexpr" for c in const}}
            specs.append((k._norm_backward_loop_kernel, sig, const, 8))
    return specs


ALL_SPECS = [softmax_specs, layer_norm_specs]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failures, count, start = [], 0, time.time()
    for make_specs in ALL_SPECS:
        for kernel, signature, constexprs, num_warps in make_specs():
            fn = getattr(kernel, "fn", kernel)  # unwrap @triton.autotune
            try:
                compiled = triton.compile(ASTSource(fn, signature, constexprs), target=target,
                                          options={"num_warps": num_warps})
                count += 1
                # a launch asking for more shared memory than a block may have fails on the GPU
                if compiled.metadata.shared > MAX_SHARED_BYTES[args.arch]:
                    failures.append(f"{fn.__name__} {constexprs} num_warps={num_warps}: needs "
                                    f"{compiled.metadata.shared} bytes of shared memory")
            except Exception as exc:  # report every failure, not just the first
                failures.append(f"{fn.__name__} {constexprs} num_warps={num_warps}: {type(exc).__name__}: {exc}")
    for f in failures:
        print("FAILED", f)
    print(f"compiled {count} Triton kernel variants for sm_{args.arch} in {time.time() - start:.1f}s; "
          f"{len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
