"""Compile every Triton kernel for an sm_90 GPU on a machine that has none, and read its SASS.

The interpreter misses what a real compile rejects (dot shapes, unsupported casts,
register-file limits); triton.compile with a GPU target needs no GPU. Run it in a
process WITHOUT TRITON_INTERPRET (tests/test_build.py does):

    python tests/triton_compile_check.py [--arch 90] [--jobs N]

Each op lists the (kernel, signature, constexprs) it launches with; add a line here when
you add a kernel. Each is compiled at every num_warps its launch can be offered
(fastdl.triton._launch.tuned_num_warps), twice: with ALIGN 1, as for rows of any length
and alignment, and as a launch on 16-byte aligned rows compiles it: 16-byte aligned pointers
and ALIGN = 16 bytes of elements, the widths and row strides themselves unspecialised (a
width of 1000 fp16 values; the benchmark shapes, which Triton also specialises as divisible
by 16, can only vectorise better); the kernels that peel rows (VEC) as for an odd width whose
rows are all off 16-byte boundaries alike (ALIGN 1, VEC 16 bytes: a 50257 vocabulary).
Checked, for fp32 / fp16 / bf16:
  * no local memory: a spill costs more than the bandwidth these kernels are after. Read
    from the cubin's resource usage (cuobjdump -res-usage: a stack frame, where ptxas puts
    spills, or local memory), which agreed with the LDL / STL count of the SASS on all 1020
    variants (23 fp64 ones spill). fp64 (for gradcheck) is exempt: its big tiles spill at
    any warp count;
  * aligned, on the SASS (nvdisasm): rows move in 128-bit loads and stores (LDG.E.128 /
    STG.E.128) where a thread holds 16 bytes of the tile or more, and no 16-bit global
    access is left in the 16-bit kernels but the peeling kernels' ragged edges
    (EDGE_ACCESSES).
"""
import argparse
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton import knobs  # noqa: E402

POINTER = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "fp64": "*fp64"}
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}
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
                const = dict(BLOCK_COLS=block_cols, ROWS=rows, LOG=log, ACC=ACC[dtype])
                sig = {"x_ptr": POINTER[dtype], "y_ptr": POINTER[dtype], "x_row_stride_vecs": "i64",
                       "n_rows": "i32", "n_col_vecs": "i32", **{c: "constexpr" for c in const}}
                specs.append((k._softmax_forward_tile_kernel, sig, const))
                sig = {"dy_ptr": POINTER[dtype], "y_ptr": POINTER[dtype], "dx_ptr": POINTER[dtype],
                       "dy_row_stride_vecs": "i64", "y_row_stride_vecs": "i64", "n_rows": "i32",
                       "n_col_vecs": "i32", **{c: "constexpr" for c in const}}
                specs.append((k._softmax_backward_tile_kernel, sig, const))
            for row_loop in (False, True):  # a program a row, or programs walking rows (LOOP_PROGRAMS_PER_SM)
                const = dict(BLOCK_COLS=k.LOOP_BLOCK_COLS, LOG=log, ACC=ACC[dtype], ROW_LOOP=row_loop)
                sig = {"x_ptr": POINTER[dtype], "y_ptr": POINTER[dtype], "x_row_stride_vecs": "i64",
                       "n_rows": "i32", "n_col_vecs": "i32", **{c: "constexpr" for c in const}}
                specs.append((k._softmax_forward_loop_kernel, sig, const))
                sig = {"dy_ptr": POINTER[dtype], "y_ptr": POINTER[dtype], "dx_ptr": POINTER[dtype],
                       "dy_row_stride_vecs": "i64", "y_row_stride_vecs": "i64", "n_rows": "i32", "n_col_vecs": "i32",
                       **{c: "constexpr" for c in const}}
                specs.append((k._softmax_backward_loop_kernel, sig, const))
            # split rows: (max, sum) / dot per chunk, then the write; up to 1024 chunks a row
            stat = "*fp64" if dtype == "fp64" else "*fp32"
            chunk_args = {"n_col_vecs": "i32", "chunk_cols": "i32", "n_chunks": "i32"}
            const = dict(BLOCK_COLS=k.LOOP_BLOCK_COLS, ACC=ACC[dtype])
            sig = {"x_ptr": POINTER[dtype], "max_ptr": stat, "sum_ptr": stat, "x_row_stride_vecs": "i64",
                   **chunk_args, **{c: "constexpr" for c in const}}
            if not log:
                specs.append((k._softmax_chunk_stats_kernel, sig, const))
            const = dict(BLOCK_COLS=k.LOOP_BLOCK_COLS, LOG=log, ACC=ACC[dtype])
            sig = {"dy_ptr": POINTER[dtype], "y_ptr": POINTER[dtype], "dot_ptr": stat, "dy_row_stride_vecs": "i64",
                   "y_row_stride_vecs": "i64", **chunk_args, **{c: "constexpr" for c in const}}
            specs.append((k._softmax_backward_chunk_dot_kernel, sig, const))
            for block_chunks in (2, 1024):
                const = dict(BLOCK_COLS=k.LOOP_BLOCK_COLS, BLOCK_CHUNKS=block_chunks, LOG=log, ACC=ACC[dtype])
                sig = {"x_ptr": POINTER[dtype], "y_ptr": POINTER[dtype], "max_ptr": stat, "sum_ptr": stat,
                       "x_row_stride_vecs": "i64", **chunk_args, **{c: "constexpr" for c in const}}
                specs.append((k._softmax_chunk_write_kernel, sig, const))
                sig = {"dy_ptr": POINTER[dtype], "y_ptr": POINTER[dtype], "dx_ptr": POINTER[dtype], "dot_ptr": stat,
                       "dy_row_stride_vecs": "i64", "y_row_stride_vecs": "i64", **chunk_args,
                       **{c: "constexpr" for c in const}}
                specs.append((k._softmax_backward_chunk_write_kernel, sig, const))
    # a 16-bit x's softmax written in fp32 (out_dtype: torch.softmax(x, dtype=float32), CUDA
    # autocast), and its backward from fp32 dy and y to a 16-bit dx
    for dtype in ("fp16", "bf16"):
        p, rows_args = POINTER[dtype], {"dy_row_stride_vecs": "i64", "y_row_stride_vecs": "i64"}
        chunk_args = {"n_col_vecs": "i32", "chunk_cols": "i32", "n_chunks": "i32"}
        for log in (False, True):
            const = dict(BLOCK_COLS=k.SINGLE_PASS_MAX_COLS, ROWS=1, LOG=log, ACC=tl.float32)
            tile = {"n_rows": "i32", "n_col_vecs": "i32", **{c: "constexpr" for c in const}}
            specs.append((k._softmax_forward_tile_kernel,
                          {"x_ptr": p, "y_ptr": "*fp32", "x_row_stride_vecs": "i64", **tile}, const))
            specs.append((k._softmax_backward_tile_kernel,
                          {"dy_ptr": "*fp32", "y_ptr": "*fp32", "dx_ptr": p, **rows_args, **tile}, const))
            const = dict(BLOCK_COLS=k.LOOP_BLOCK_COLS, LOG=log, ACC=tl.float32, ROW_LOOP=False)
            loop = {"n_rows": "i32", "n_col_vecs": "i32", **{c: "constexpr" for c in const}}
            specs.append((k._softmax_forward_loop_kernel,
                          {"x_ptr": p, "y_ptr": "*fp32", "x_row_stride_vecs": "i64", **loop}, const))
            specs.append((k._softmax_backward_loop_kernel,
                          {"dy_ptr": "*fp32", "y_ptr": "*fp32", "dx_ptr": p, **rows_args, **loop}, const))
            const = dict(BLOCK_COLS=k.LOOP_BLOCK_COLS, BLOCK_CHUNKS=1024, LOG=log, ACC=tl.float32)
            chunk = {**chunk_args, **{c: "constexpr" for c in const}}
            specs.append((k._softmax_chunk_write_kernel, {"x_ptr": p, "y_ptr": "*fp32", "max_ptr": "*fp32",
                                                          "sum_ptr": "*fp32", "x_row_stride_vecs": "i64", **chunk},
                          const))
            specs.append((k._softmax_backward_chunk_write_kernel,
                          {"dy_ptr": "*fp32", "y_ptr": "*fp32", "dx_ptr": p, "dot_ptr": "*fp32", **rows_args, **chunk},
                          const))
    return specs


def layer_norm_specs():
    from fastdl.triton import layer_norm as k

    specs = []
    variants = [  # (RMS, residual/dsum, weight, bias)
        (False, False, True, True), (False, True, True, True), (True, False, True, False),
        (True, True, True, False), (False, False, False, False)]
    for dtype in POINTER:
        p = POINTER[dtype]
        # y (and dy) in x's dtype, and for a 16-bit x also in fp32 (out_dtype: the norm CUDA
        # autocast runs in fp32, the cast of x, or of the fused add's 16-bit sum, fused); the
        # residual and sum in x's dtype, and for a 16-bit x also in fp32 (an fp32 residual
        # stream beside it: the sum promoted, y in fp32)
        wide = ["*fp32"] if dtype in ("fp16", "bf16") else []
        outs = [(rms, fused, has_w, has_b, out, res) for rms, fused, has_w, has_b in variants
                for out, res in [(p, p)] + [(w, w_res) for w in wide for w_res in [p] + wide * fused]]
        for rms, fused, has_w, has_b, out, res in outs if dtype == "fp32" else outs[:5]:
            flags = dict(RMS=rms, HAS_WEIGHT=has_w, HAS_BIAS=has_b, ACC=ACC[dtype])
            stat = "*fp64" if dtype == "fp64" else "*fp32"
            fwd_ptrs = {"x_ptr": p, "residual_ptr": res, "weight_ptr": "*fp32", "bias_ptr": "*fp32", "y_ptr": out,
                        "sum_ptr": res, "mean_ptr": stat, "rstd_ptr": stat}
            bwd_ptrs = {"dy_ptr": out, "dsum_ptr": p, "x_ptr": p, "weight_ptr": "*fp32", "mean_ptr": stat,
                        "rstd_ptr": stat, "dx_ptr": p, "dweight_partial_ptr": stat, "dbias_partial_ptr": stat}
            # dx of fp32 rows also in 16 bits (the fp32 sum of a 16-bit x and an fp32 residual)
            narrows = [(p, False)] + [(n, True) for n in ("*fp16", "*bf16") if dtype == "fp32" and fused]
            for block_cols, rows in [(1024, 4), (k.FORWARD_TILE_MAX_COLS, 1)]:
                const = dict(BLOCK_COLS=block_cols, ROWS=rows, HAS_RESIDUAL=fused, **flags)
                sig = {**fwd_ptrs, "x_row_stride_vecs": "i64", "residual_row_stride_vecs": "i64",
                       "n_rows": "i32", "n_col_vecs": "i32", "eps": "fp32", **{c: "constexpr" for c in const}}
                specs.append((k._norm_forward_tile_kernel, sig, const))
            # (the backward of an fp32 sum is the fp32 one's: no spec of its own)
            for (block_cols, rows), (narrow, has_narrow) in itertools.product(
                    [(1024, 4), (k.BACKWARD_TILE_MAX_COLS, 1)] if res == p else [], narrows):
                const = dict(BLOCK_COLS=block_cols, ROWS=rows, HAS_DSUM=fused, HAS_DX_NARROW=has_narrow,
                             PARAM_SUMS=True, PREFETCH=False, **flags)
                sig = {**bwd_ptrs, "dx_narrow_ptr": narrow, "dy_row_stride_vecs": "i64", "dsum_row_stride_vecs": "i64",
                       "x_row_stride_vecs": "i64", "n_rows": "i32", "n_col_vecs": "i32", "rows_per_program": "i32",
                       **{c: "constexpr" for c in const}}
                specs.append((k._norm_backward_tile_kernel, sig, const))
                if not fused and not has_narrow and (has_w or has_b):  # dx alone (TILE_PARAM_SUMS off)
                    specs.append((k._norm_backward_tile_kernel, sig, {**const, "PARAM_SUMS": False}))
                # the next tile's loads first (TILE_PREFETCH, off until timed; tiles of TILE_ELEMENTS at
                # most): the tile tune.py times it with, for rows and parameters of one dtype with a
                # weight, unfused (the fused ones would double its variants in CI's compile check)
                if block_cols == 1024 and out == p and has_w and not has_narrow and not fused:
                    prefetch_rows = max(1, k.TILE_ELEMENTS // block_cols)
                    specs.append((k._norm_backward_tile_kernel, sig, {**const, "ROWS": prefetch_rows, "PREFETCH": True}))
            loop_flags = {f: v for f, v in flags.items() if f != "HAS_BIAS"}  # dx alone
            loop_ptrs = {name: v for name, v in bwd_ptrs.items() if "partial" not in name}
            # a program a row, and programs walking rows (LOOP_PROGRAMS_PER_SM, off by default: for
            # rows and parameters of one dtype with a weight, the cases tune.py times; every
            # variant of it took CI's compile check from ~190 s to ~280 s)
            for row_loop in (False, True) if out == p and res == p and has_w else (False,):
                const = dict(BLOCK_COLS=k.LOOP_BLOCK_COLS, HAS_RESIDUAL=fused, ROW_LOOP=row_loop, **flags)
                sig = {**fwd_ptrs, "x_row_stride_vecs": "i64", "residual_row_stride_vecs": "i64", "n_rows": "i32",
                       "n_col_vecs": "i32", "eps": "fp32", **{c: "constexpr" for c in const}}
                specs.append((k._norm_forward_loop_kernel, sig, const))
                for narrow, has_narrow in narrows if res == p else []:
                    const = dict(BLOCK_COLS=k.LOOP_BLOCK_COLS, HAS_DSUM=fused, HAS_DX_NARROW=has_narrow,
                                 ROW_LOOP=row_loop, **loop_flags)
                    sig = {**loop_ptrs, "dx_narrow_ptr": narrow, "dy_row_stride_vecs": "i64",
                           "dsum_row_stride_vecs": "i64", "x_row_stride_vecs": "i64", "n_rows": "i32",
                           "n_col_vecs": "i32", **{c: "constexpr" for c in const}}
                    specs.append((k._norm_backward_loop_kernel, sig, const))
            if res == p and not fused and (has_w or has_b):  # the longer rows' dweight / dbias (dy as dx's)
                const = dict(BLOCK_COLS=k.PARAM_BLOCK_COLS, ROWS=k.PARAM_ROWS, **flags)
                sig = {name: bwd_ptrs[name] for name in ("dy_ptr", "x_ptr", "mean_ptr", "rstd_ptr",
                                                         "dweight_partial_ptr", "dbias_partial_ptr")}
                sig.update({"dy_row_stride_vecs": "i64", "x_row_stride_vecs": "i64", "n_rows": "i32",
                            "n_col_vecs": "i32", "rows_per_block": "i32", **{c: "constexpr" for c in const}})
                specs.append((k._norm_param_grad_kernel, sig, const))
        # stage 2 of dweight / dbias: dweight in x's dtype (a 16-bit model's weight), dbias in fp32
        stat = "*fp64" if dtype == "fp64" else "*fp32"
        for has_w, has_b in ((True, True), (True, False), (False, True)):
            const = dict(BLOCK_COLS=k.SUM_BLOCK_COLS, ROWS=k.SUM_ROWS, HAS_WEIGHT=has_w, HAS_BIAS=has_b,
                         ACC=ACC[dtype])
            sig = {"dweight_partial_ptr": stat, "dbias_partial_ptr": stat, "dweight_ptr": p, "dbias_ptr": stat,
                   "n_partial_rows": "i32", "n_col_vecs": "i32", **{c: "constexpr" for c in const}}
            specs.append((k._sum_partial_rows_kernel, sig, const))
    return specs


ALL_SPECS = [softmax_specs, layer_norm_specs]
# a thread's stack frame and local memory in bytes, in cuobjdump -res-usage's line
LOCAL_MEMORY = re.compile(r"\b(?:STACK|LOCAL):(\d+)")
SIXTEEN_BIT_GLOBAL = re.compile(r"\b(?:LDG|STG)\.E\.[US]16\b")
# The kernels that peel rows (VEC) move the ragged head and tail of a row one element a
# thread: one 16-bit instruction for each of their edge loads and stores in the source.
# A body moved element by element would take at least 8 per load (4096 columns, 16 warps).
ROW_LOOP_SPILL_BYTES = 32
EDGE_ACCESSES = {"_softmax_forward_loop_kernel": 3, "_softmax_chunk_stats_kernel": 1, "_softmax_chunk_write_kernel": 2,
                 "_softmax_backward_loop_kernel": 5, "_softmax_backward_chunk_dot_kernel": 2,
                 "_softmax_backward_chunk_write_kernel": 3}


def row_dtype(signature):
    """The dtype of the rows a kernel works (what ALIGN and VEC count in): x's where the kernel
    reads an x, else dx's where it writes one (a norm's y / dy and a softmax's y / dy may be fp32
    beside a 16-bit x, and the launchers count the narrower elements), else its first pointer's."""
    first = next(v for v in signature.values() if v.startswith("*"))
    return signature.get("x_ptr", signature.get("dx_ptr", first))[1:]


def variants():
    """(kernel, signature, constexprs, num_warps, aligned) for every compile to check: each
    spec unaligned (ALIGN 1, and VEC 1 where the kernel peels rows: rows of any length and
    alignment) and aligned, with 16-byte aligned pointers and n_cols and the row strides left
    unspecialised, as Triton leaves a width of 1000 that divides by 8 but not by 16: ALIGN 16
    bytes of elements, or for the kernels that peel rows, ALIGN 1 and VEC 16 bytes (an odd
    width whose rows are all off 16-byte boundaries alike)."""
    for make_specs in ALL_SPECS:
        for kernel, signature, constexprs in make_specs():
            signature = {**signature, "ALIGN": "constexpr", "VEC": "constexpr"}
            signature = {name: signature[name] for name in kernel.fn.arg_names}  # in the kernel's order
            vec = 16 // ITEMSIZE[row_dtype(signature)]
            peels = "VEC" in kernel.fn.arg_names
            unaligned = {**constexprs, "ALIGN": 1, **({"VEC": 1} if peels else {})}
            aligned = {**constexprs, **({"ALIGN": 1, "VEC": vec} if peels else {"ALIGN": vec})}
            for num_warps in kernel.offered_num_warps(constexprs):
                # (the norm backward's narrow dx is fused for rows of 16-byte vectors only)
                if not constexprs.get("HAS_DX_NARROW"):
                    yield kernel, signature, unaligned, num_warps, False
                if constexprs["BLOCK_COLS"] >= 16:  # one-column rows cannot be vectorised
                    yield kernel, signature, aligned, num_warps, True


VARIANTS = []  # filled before the workers fork: kernels do not pickle, indices do


def check_variant(index, arch):
    """Compile VARIANTS[index] and check its resource usage and SASS; returns (description, problems,
    fp64 spills)."""
    kernel, signature, constexprs, num_warps, aligned = VARIANTS[index]
    fn = kernel.fn  # the @triton.jit under tuned_num_warps
    dtype = row_dtype(signature)
    out = signature.get("dy_ptr", signature.get("y_ptr"))  # y's dtype (fp32 beside a 16-bit x or dx)
    dtype_label = f"{dtype} (y {out[1:]})" if out not in (None, f"*{dtype}") else dtype
    what = (f"{fn.__name__} {dtype_label} {dict((k, v) for k, v in constexprs.items() if k != 'ACC')} "
            f"num_warps={num_warps}{' aligned' if aligned else ''}")
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        # as Triton specialises a launch: pointers when 16-byte aligned; chunk_cols, a multiple
        # of the loop's block, always
        if (aligned and signature[name].startswith("*")) or name == "chunk_cols":
            attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps})
    except Exception as exc:  # report every failure, not just the first
        return what, [f"{type(exc).__name__}: {exc}"], 0
    problems = []
    # a launch asking for more shared memory than a block may have fails on the GPU
    if compiled.metadata.shared > MAX_SHARED_BYTES[arch]:
        problems.append(f"needs {compiled.metadata.shared} bytes of shared memory")
    # 128-bit accesses need 16 bytes of a row in each thread's share of the tile
    thread_bytes = constexprs["BLOCK_COLS"] * constexprs.get("ROWS", 1) // (32 * num_warps) * ITEMSIZE[dtype]
    check_vectors = aligned and dtype != "fp64" and thread_bytes >= 16
    check_16_bit = aligned and dtype in ("fp16", "bf16") and thread_bytes >= 4
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
        # nvdisasm only where the SASS is read: ~0.18 s a cubin, most of it start-up, where
        # the resource usage takes 2 ms. -ndf: no dataflow analysis, which only labels
        # branch-stack jumps (the text came out byte-identical for 60 variants sampled)
        sass = subprocess.run([knobs.nvidia.nvdisasm.path, "-c", "-ndf", cubin.name], capture_output=True, text=True,
                              check=True).stdout if check_vectors or check_16_bit else ""
    local = LOCAL_MEMORY.findall(usage)
    if len(local) != 2:  # STACK and LOCAL of the one kernel
        return what, problems + [f"cuobjdump -res-usage: no resource line for one kernel in {usage!r}"], 0
    local_bytes = int(local[0]) + int(local[1])
    if dtype == "fp64":
        return what, problems, local_bytes
    # the loop kernels' row loop (LOOP_PROGRAMS_PER_SM, off by default) saves a value or two a
    # row in local memory in some variants (fastdl/triton/softmax.py says which): accepted there
    # up to ROW_LOOP_SPILL_BYTES, for the tuner to weigh
    if local_bytes and not (constexprs.get("ROW_LOOP") and local_bytes <= ROW_LOOP_SPILL_BYTES):
        problems.append(f"spills: {local_bytes} bytes of stack frame / local memory a thread")
    if check_vectors:
        if "LDG.E.128" not in sass:
            problems.append("no 128-bit global load (LDG.E.128)")
        # rows written: dx, or y in a forward (a backward reads y)
        writes_rows = "dx_ptr" in signature or ("y_ptr" in signature and "dy_ptr" not in signature)
        if writes_rows and "STG.E.128" not in sass:
            problems.append("writes rows without a 128-bit global store (STG.E.128)")
    sixteen_bit = SIXTEEN_BIT_GLOBAL.findall(sass)
    allowed = EDGE_ACCESSES.get(fn.__name__, 0)
    if check_16_bit and len(sixteen_bit) > allowed:
        problems.append(f"{len(sixteen_bit)} 16-bit global accesses left ({', '.join(sorted(set(sixteen_bit)))}), "
                        f"{allowed} allowed")
    return what, problems, 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    start = time.time()
    VARIANTS.extend(variants())
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:  # nothing here touches a GPU
        results = pool.starmap(check_variant, [(i, args.arch) for i in range(len(VARIANTS))])
    failures = [f"{what}: {problem}" for what, problems, _ in results for problem in problems]
    fp64_spills = sum(1 for _, _, spills in results if spills)
    for f in failures:
        print("FAILED", f)
    aligned = sum(1 for v in VARIANTS if v[-1])
    print(f"compiled {len(results)} Triton kernel variants for sm_{args.arch} ({aligned} of them for aligned rows) "
          f"in {time.time() - start:.1f}s; checked: no spills (fp32/fp16/bf16), 128-bit row loads and stores in the "
          f"SASS (aligned); {fp64_spills} fp64 variants spill (exempt); {len(failures)} problems")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
