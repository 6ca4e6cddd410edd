"""python -m fastdl.bench.tune [--quick] [--out FILE]: the launchers' tuning knobs, timed.

Each knob is a module constant of fastdl/triton/<op>.py (set for the run, then put back)
or an environment variable the CUDA launchers read at each launch. A row times one op
with every value of one knob, the other knobs at their defaults, on the shape the knob
matters for, beside torch eager: median ms, GB/s and % of the copy bandwidth measured in
the same run. The default value is marked *; where another wins by more than the noise
(run it twice), change the default in the source and cite the run there.

Made for a lent GPU's few minutes (`STEPS="build tune" scripts/gpu_check.sh OUT`); on a
CPU-only machine it runs the Triton knobs under TRITON_INTERPRET=1 at toy sizes (--quick),
which checks that the knobs still exist, not what they are worth.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import sys
from typing import Callable

import torch

import fastdl
from fastdl.bench.harness import copy_bandwidth_gbps, dtype_name, time_ms


@dataclasses.dataclass
class Knob:
    name: str  # "triton.softmax.LOOP_BLOCK_COLS" (a module constant) or "env:FASTDL_CUDA_SPLIT_PER_SM"
    values: list  # None for an environment variable: unset (the launcher's default)

    def default(self):
        if self.name.startswith("env:"):
            return None
        module, attr = self.name.rsplit(".", 1)
        return getattr(importlib.import_module(f"fastdl.{module}"), attr)

    @contextlib.contextmanager
    def set(self, value):
        """The knob at `value` inside the block, as before after it."""
        if self.name.startswith("env:"):
            var = self.name[4:]
            old = os.environ.get(var)
            _set_env(var, value)
            try:
                yield
            finally:
                _set_env(var, old)
            return
        module_name, attr = self.name.rsplit(".", 1)
        module = importlib.import_module(f"fastdl.{module_name}")
        old = getattr(module, attr)
        setattr(module, attr, value)
        try:
            yield
        finally:
            setattr(module, attr, old)


def _set_env(var: str, value) -> None:
    if value is None:
        os.environ.pop(var, None)
    else:
        os.environ[var] = str(value)


# The CUDA knobs at the values that keep every launch on the tiles and the tiles' own dweight /
# dbias sums, where the launchers' defaults (from the H200 tuner, 2b1309b) take the packed kernels
# and norm_param_grad_kernel for 16-bit rows past 2048 columns: what the emulated kernel tests and
# scripts/sanitize_kernels.py run unless a test or pass names another.
CUDA_TILE_KERNELS = {"FASTDL_CUDA_PACKED_TILES": "0", "FASTDL_CUDA_PACKED_NORM": "0",
                     "FASTDL_CUDA_NORM_PARAM_KERNEL": "0"}


@dataclasses.dataclass
class TuneCase:
    op: str  # softmax, layer_norm
    direction: str  # fwd, bwd (softmax), fwd+bwd (layer_norm)
    backend: str  # triton, cuda
    shape: tuple  # (rows, cols)
    knob: Knob
    dtype: torch.dtype = torch.bfloat16


def _softmax_fns(direction, shape, dtype, device):
    """(fastdl's call, torch eager's call, bytes moved)."""
    x = torch.randn(shape, device=device, dtype=dtype)
    n_bytes = x.numel() * x.element_size()
    if direction == "fwd":
        return lambda: fastdl.ops.softmax(x, -1), lambda: torch.softmax(x, -1), 2 * n_bytes
    y, dy = torch.softmax(x, -1), torch.randn_like(x)
    return (lambda: fastdl.ops.softmax_backward(dy, y, -1),
            lambda: torch._softmax_backward_data(dy, y, -1, dtype), 3 * n_bytes)


def _layer_norm_fns(direction, shape, dtype, device):
    """As _softmax_fns; weights in x's dtype, as the benchmark's cases."""
    n = shape[1]
    grad = direction != "fwd"
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=grad)
    w = torch.rand(n, device=device, dtype=dtype, requires_grad=grad)
    b = torch.randn(n, device=device, dtype=dtype, requires_grad=grad)
    n_bytes = x.numel() * x.element_size()
    if not grad:
        return (lambda: fastdl.ops.layer_norm(x, n, w, b),
                lambda: torch.nn.functional.layer_norm(x, (n,), w, b), 2 * n_bytes)
    dy = torch.randn(shape, device=device, dtype=dtype)
    return (lambda: torch.autograd.grad(fastdl.ops.layer_norm(x, n, w, b), (x, w, b), dy),
            lambda: torch.autograd.grad(torch.nn.functional.layer_norm(x, (n,), w, b), (x, w, b), dy),
            5 * n_bytes)  # fwd: x, y; bwd: dy, x, dx


FNS: dict[str, Callable] = {"softmax": _softmax_fns, "layer_norm": _layer_norm_fns}


def all_cases(quick: bool) -> list[TuneCase]:
    """Every case, whether or not its backend runs here."""
    if quick:  # toy sizes, a few values
        return [TuneCase("softmax", "fwd", "triton", (3, 300), Knob("triton.softmax.TILE_ELEMENTS", [1024, 4096])),
               TuneCase("softmax", "fwd", "triton", (2, 20000), Knob("triton.softmax.SPLIT_PROGRAMS_PER_SM", [0, 4])),
               TuneCase("layer_norm", "fwd+bwd", "triton", (5, 300), Knob("triton.layer_norm.PROGRAMS_PER_SM", [1, 4]))]
    sm = "triton.softmax."
    ln = "triton.layer_norm."
    return [
        # softmax: short rows (tiles of several rows), the longest tile, long rows one program a row, few long rows
        TuneCase("softmax", "fwd", "triton", (4096, 256), Knob(sm + "TILE_ELEMENTS", [1024, 2048, 4096, 8192, 16384])),
        TuneCase("softmax", "fwd", "triton", (4096, 1024), Knob(sm + "TILE_ELEMENTS", [1024, 2048, 4096, 8192, 16384])),
        TuneCase("softmax", "bwd", "triton", (4096, 1024), Knob(sm + "TILE_ELEMENTS", [1024, 2048, 4096, 8192, 16384])),
        TuneCase("softmax", "fwd", "triton", (4096, 16384), Knob(sm + "SINGLE_PASS_MAX_COLS", [8192, 16384])),
        TuneCase("softmax", "bwd", "triton", (4096, 16384), Knob(sm + "SINGLE_PASS_MAX_COLS", [8192, 16384])),
        TuneCase("softmax", "fwd", "triton", (4096, 65536), Knob(sm + "LOOP_BLOCK_COLS", [1024, 2048, 4096, 8192])),
        TuneCase("softmax", "bwd", "triton", (4096, 65536), Knob(sm + "LOOP_BLOCK_COLS", [1024, 2048, 4096, 8192])),
        # the loop kernels' programs: a program a row (0) or K an SM walking rows (is a row's second read from L2?)
        *[TuneCase("softmax", direction, "triton", shape, Knob(sm + "LOOP_PROGRAMS_PER_SM", [0, 1, 2, 4]))
          for direction in ("fwd", "bwd") for shape in ((4096, 65536), (1024, 50257))],
        TuneCase("softmax", "fwd", "triton", (8, 262144), Knob(sm + "SPLIT_PROGRAMS_PER_SM", [0, 1, 2, 4, 8, 16])),
        TuneCase("softmax", "bwd", "triton", (8, 262144), Knob(sm + "SPLIT_PROGRAMS_PER_SM", [0, 1, 2, 4, 8, 16])),
        TuneCase("softmax", "fwd", "cuda", (8, 262144), Knob("env:FASTDL_CUDA_SPLIT_PER_SM", [None, 0, 1, 2, 4, 8])),
        # the CUDA block kernels (fp32 rows past 32768 columns) in a block a row (unset) or K an SM walking rows
        *[TuneCase("softmax", direction, "cuda", (4096, 65536), Knob("env:FASTDL_CUDA_LOOP_BLOCKS_PER_SM",
                                                                       [None, 1, 2, 4]), torch.float32)
          for direction in ("fwd", "bwd")],
        TuneCase("softmax", "bwd", "cuda", (8, 262144), Knob("env:FASTDL_CUDA_SPLIT_PER_SM", [None, 0, 1, 2, 4, 8])),
        # the CUDA tiles: values a thread before a tile takes more threads (kernels/common/row_tile.cuh)
        *[TuneCase("softmax", direction, "cuda", (4096, cols), Knob("env:FASTDL_CUDA_TILE_ELEMS", [None, 8, 16, 32]))
          for direction in ("fwd", "bwd") for cols in (1024, 4096, 16384)],
        *[TuneCase("layer_norm", direction, "cuda", (4096, cols), Knob("env:FASTDL_CUDA_TILE_ELEMS",
                                                                        [None, 8, 16, 32]))
          for direction, cols in (("fwd", 1024), ("fwd", 4096), ("fwd", 16384), ("fwd+bwd", 1024), ("fwd+bwd", 4096))],
        # the norm forward of 16-bit rows held as they are, 32 values a thread (the packed kernel, unset), or the
        # tile's (0)
        *[TuneCase("layer_norm", "fwd", "cuda", (4096, cols), Knob("env:FASTDL_CUDA_PACKED_NORM", [None, 0]))
          for cols in (4096, 8192, 16384)],
        # softmax's 16-bit rows of the tiles' lengths held packed in blocks of 128-512 threads (unset) or by the
        # tile (0)
        *[TuneCase("softmax", direction, "cuda", (4096, cols), Knob("env:FASTDL_CUDA_PACKED_TILES", [None, 0]))
          for direction in ("fwd", "bwd") for cols in (4096, 8192, 16384)],
        TuneCase("softmax", "fwd", "cuda", (1024, 8193), Knob("env:FASTDL_CUDA_PACKED_TILES", [None, 0])),
        # softmax's long rows in registers (the packed kernels) or read twice (the block kernels); a GPT-2
        # vocabulary's rows off 16-byte boundaries (the ragged columns held beside the vectors)
        *[TuneCase("softmax", direction, "cuda", shape, Knob("env:FASTDL_CUDA_PACKED_ROWS", [None, 0]))
          for direction in ("fwd", "bwd") for shape in ((4096, 32768), (4096, 65536), (1024, 50257))],
        # layer_norm: the backward's programs (partial rows of dweight / dbias), tiles, long rows
        TuneCase("layer_norm", "fwd+bwd", "triton", (4096, 1024), Knob(ln + "PROGRAMS_PER_SM", [1, 2, 4, 8, 16])),
        TuneCase("layer_norm", "fwd+bwd", "triton", (16384, 4096), Knob(ln + "PROGRAMS_PER_SM", [1, 2, 4, 8, 16])),
        # dweight / dbias summed by the tile kernel's programs, or by a kernel of their own (x and dy read again)
        *[TuneCase("layer_norm", "fwd+bwd", "triton", shape, Knob(ln + "TILE_PARAM_SUMS", [True, False]))
          for shape in ((4096, 512), (4096, 1024), (16384, 1024), (4096, 4096))],
        # the walking backward tile's next tile loaded before this one's sums
        *[TuneCase("layer_norm", "fwd+bwd", "triton", shape, Knob(ln + "TILE_PREFETCH", [False, True]))
          for shape in ((4096, 512), (4096, 1024), (16384, 1024))],
        # the partial rows' sum: n_cols / SUM_BLOCK_COLS programs (128 at hidden 1024), each over every partial row
        *[TuneCase("layer_norm", "fwd+bwd", "triton", (4096, cols), Knob(ln + "SUM_BLOCK_COLS", [4, 8, 16, 32]))
          for cols in (512, 1024)],
        # the CUDA backward's dweight / dbias by norm_param_grad_kernel (dx alone, 16-bit rows of whole
        # vectors held as they are up to 16384 columns: unset past 2048 columns, 1) or in its blocks (0; unset
        # up to 2048)
        *[TuneCase("layer_norm", "fwd+bwd", "cuda", shape, Knob("env:FASTDL_CUDA_NORM_PARAM_KERNEL",
                                                                   [None, 0, 1]))
          for shape in ((4096, 1024), (16384, 1024), (4096, 4096), (4096, 8192), (4096, 16384))],
        TuneCase("layer_norm", "fwd+bwd", "cuda", (4096, 1024), Knob("env:FASTDL_CUDA_NORM_BLOCKS_PER_SM",
                                                                       [None, 1, 2, 4, 8, 16])),
        TuneCase("layer_norm", "fwd+bwd", "cuda", (16384, 4096), Knob("env:FASTDL_CUDA_NORM_BLOCKS_PER_SM",
                                                                        [None, 1, 2, 4, 8, 16])),
        # the CUDA backward loop kernel's dweight / dbias sums in shared memory (default) or in the partial rows
        *[TuneCase("layer_norm", "fwd+bwd", "cuda", (4096, cols), Knob("env:FASTDL_CUDA_NORM_SHARED_SUMS", [None, 0]),
                   dtype)
          for cols in (16384, 24576) for dtype in (torch.bfloat16, torch.float32)],
        TuneCase("layer_norm", "fwd", "triton", (4096, 1024), Knob(ln + "TILE_ELEMENTS", [1024, 2048, 4096, 8192])),
        TuneCase("layer_norm", "fwd+bwd", "triton", (4096, 1024), Knob(ln + "TILE_ELEMENTS", [1024, 2048, 4096, 8192])),
        TuneCase("layer_norm", "fwd", "triton", (4096, 16384), Knob(ln + "FORWARD_TILE_MAX_COLS", [8192, 16384])),
        TuneCase("layer_norm", "fwd+bwd", "triton", (4096, 16384), Knob(ln + "BACKWARD_TILE_MAX_COLS",
                                                                           [4096, 8192, 16384])),
        TuneCase("layer_norm", "fwd+bwd", "triton", (4096, 16384), Knob(ln + "LOOP_BLOCK_COLS", [1024, 2048, 4096])),
        # the loop kernels' programs: a program a row (0) or K an SM walking rows (the second sweep's reads from L2?)
        TuneCase("layer_norm", "fwd+bwd", "triton", (4096, 16384), Knob(ln + "LOOP_PROGRAMS_PER_SM", [0, 1, 2, 4])),
        TuneCase("layer_norm", "fwd", "triton", (4096, 32768), Knob(ln + "LOOP_PROGRAMS_PER_SM", [0, 1, 2, 4])),
        TuneCase("layer_norm", "fwd", "triton", (4096, 32768), Knob(ln + "LOOP_BLOCK_COLS", [1024, 2048, 4096])),
        # CUDA's norm forward loop kernel (past 16384 columns, two sweeps) in a block a row or K an SM walking rows
        *[TuneCase("layer_norm", "fwd", "cuda", (4096, 32768),
                   Knob("env:FASTDL_CUDA_LOOP_BLOCKS_PER_SM", [None, 1, 2, 4]), dtype)
          for dtype in (torch.bfloat16, torch.float32)],
        # longer rows' dweight / dbias: a program's columns and rows at once, programs an SM
        TuneCase("layer_norm", "fwd+bwd", "triton", (4096, 16384), Knob(ln + "PARAM_BLOCK_COLS", [128, 256, 512])),
        TuneCase("layer_norm", "fwd+bwd", "triton", (4096, 16384), Knob(ln + "PARAM_ROWS", [8, 16, 32])),
        TuneCase("layer_norm", "fwd+bwd", "triton", (4096, 16384), Knob(ln + "PARAM_PROGRAMS_PER_SM",
                                                                           [2, 4, 8, 16])),
    ]


def case_label(case: TuneCase) -> str:
    """"layer_norm fwd+bwd triton 4096x1024 triton.layer_norm.TILE_PARAM_SUMS": what --match looks in."""
    return f"{case.op} {case.direction} {case.backend} {case.shape[0]}x{case.shape[1]} {case.knob.name}"


def cases(device: torch.device, quick: bool, match: list[str] | None = None) -> list[TuneCase]:
    """The cases whose backend runs on `device` here; with `match`, those whose label
    (case_label) holds one of its strings."""
    backends = fastdl.available_backends(device.type)
    return [c for c in all_cases(quick) if c.backend in backends
            and (not match or any(m in case_label(c) for m in match))]


def _label(knob: Knob, value) -> str:
    text = "unset" if value is None else str(value)
    return text + ("*" if value == knob.default() else "")


def run(device: torch.device, quick: bool, write: Callable[[str], None], match: list[str] | None = None) -> int:
    """Times every case (those `match` picks); returns how many knob values failed (an error, not a time)."""
    copy_gbps = copy_bandwidth_gbps(device, quick)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    write(f"# fastdl.bench.tune on {name}: copy bandwidth {copy_gbps:.0f} GB/s; * marks the default")
    write("| op | dir | backend | dtype | shape | knob | eager ms | value: ms (GB/s, % copy) ... |")
    write("| --- | --- | --- | --- | --- | --- | --- | --- |")
    failures = 0
    for case in cases(device, quick, match):
        fastdl_fn, eager_fn, n_bytes = FNS[case.op](case.direction, case.shape, case.dtype, device)
        eager_ms = time_ms(eager_fn, device, quick)[0]
        cells = []
        for value in case.knob.values:
            try:
                with case.knob.set(value), fastdl.use_backend(case.backend):
                    ms = time_ms(fastdl_fn, device, quick)[0]
                gbps = n_bytes / (ms * 1e-3) / 1e9
                cells.append(f"{_label(case.knob, value)}: {ms:.4f} ({gbps:.0f}, {100 * gbps / copy_gbps:.0f}%)")
            except Exception as exc:  # a value the kernel cannot take (out of registers, shared memory)
                failures += 1
                cells.append(f"{_label(case.knob, value)}: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
        dtype = dtype_name(case.dtype)
        write(f"| {case.op} | {case.direction} | {case.backend} | {dtype} | {case.shape[0]}x{case.shape[1]} "
              f"| {case.knob.name} | {eager_ms:.4f} | {' / '.join(cells)} |")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdl.bench.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes and short timings (a smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--match", action="append", metavar="TEXT",
                        help="only the cases whose 'op dir backend shape knob' holds TEXT (repeatable: any of them)")
    args = parser.parse_args(argv)
    lines: list[str] = []

    def write(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    failures = run(torch.device(args.device), args.quick, write, args.match)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
