"""Builds and runs the CUDA C++ launchers of kernels/ on the CPU, under the emulator in
tests/cpp/cuda_emu (a fiber a GPU thread, barriers and warp shuffles emulated), with
AddressSanitizer and UBSan: machines without a GPU run the kernels' code, catch an
out-of-bounds access, a misaligned vector access (the kernels' FASTDL_CHECK_ALIGNED, which
the emulator defines: UBSan missed a misaligned move of 16-bit values) or a barrier some
threads skip.

The kernels' sources are compiled as they are, but for four rewrites that keep every
line where it was (rewrite_source):
- each `kernel<<<grid, block, smem, stream>>>(args)` becomes
  `::fastdl_emu::launch("kernel", kernel, ::fastdl_emu::config(grid, block, smem, stream), args)`;
- a kernel declared `__launch_bounds__(N)` checks on entry that its block has at most N
  threads (a GPU refuses such a launch);
- each `__shared__` variable (static here, one copy for the blocks that run one after
  another) is declared to the emulator, which fills it with 0xff bytes (NaN) at the start
  of every block, so a read of shared memory no thread of this block wrote shows; an
  `extern __shared__ T name[];` (dynamic shared memory) becomes a pointer to the launch's
  shared_bytes, poisoned the same way.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cpp" / "cuda_emu"
KERNEL_SOURCES = sorted((ROOT / "kernels").glob("*.cu"))
# -g1: line tables only, what the sanitizers' reports need for file:line in each frame (full
# -g took layer_norm's compile from 38 to 61 s)
FLAGS = ["-std=c++17", "-O1", "-g1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-fno-omit-frame-pointer", "-fno-strict-aliasing", "-Wall", "-Wno-unused-variable"]
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}


def cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (for cuda_fp16.h and friends), or None."""
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_fp16.h").exists():
            return Path(home) / "include"
    return None


def missing_tools() -> str | None:
    """Why the emulator cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "g++ not found"
    if cuda_include() is None:
        return "no CUDA toolkit headers (cuda_fp16.h): set CUDA_HOME"
    return None


def _matching(text: str, open_at: int, opening: str, closing: str) -> int:
    """Index of the bracket closing the one at open_at (angle brackets: template args)."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == opening:
            depth += 1
        elif text[i] == closing:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {opening}{closing} from offset {open_at}")


def rewrite_launches(source: str) -> str:
    """Each `kernel<targs><<<config>>>(args)` as a fastdl_emu::launch call, lines kept."""
    out, pos = [], 0
    while (start := source.find("<<<", pos)) >= 0:
        # the kernel: an identifier, then optionally its template arguments
        k_end = start
        while source[k_end - 1].isspace():
            k_end -= 1
        k_start = k_end
        if source[k_end - 1] == ">":
            depth = 0
            while True:
                k_start -= 1
                depth += {">": 1, "<": -1}.get(source[k_start], 0)
                if depth == 0:
                    break
        while source[k_start - 1].isalnum() or source[k_start - 1] in "_:":
            k_start -= 1
        kernel = source[k_start:k_end]
        config_end = source.index(">>>", start)
        config = source[start + 3:config_end]
        args_open = config_end + 3
        while source[args_open].isspace():
            args_open += 1
        if source[args_open] != "(":
            raise ValueError(f"launch of {kernel} without arguments")
        args_close = _matching(source, args_open, "(", ")")
        args = source[args_open + 1:args_close]
        name = " ".join(kernel.split())
        call = (f'::fastdl_emu::launch("{name}", {kernel}, ::fastdl_emu::config({config})'
                f'{", " if args.strip() else ""}{args})')
        removed = source[k_start:args_close + 1]
        out.append(source[pos:k_start])
        out.append(call + "\n" * (removed.count("\n") - call.count("\n")))
        pos = args_close + 1
    out.append(source[pos:])
    return "".join(out)


def _top_level_split(text: str) -> list[str]:
    """text split at the commas outside brackets (template arguments included)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += {"(": 1, "[": 1, "<": 1, ")": -1, "]": -1, ">": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _insert_at_each(source: str, marker: str, insertion) -> str:
    """source with, for each occurrence of marker, the text insertion(source, start)
    gives inserted at the offset it gives (on the same line)."""
    out, pos = [], 0
    while (start := source.find(marker, pos)) >= 0:
        at, text = insertion(source, start)
        out += [source[pos:at], text]
        pos = at
    out.append(source[pos:])
    return "".join(out)


def _launch_bounds_check(source: str, start: int) -> tuple[int, str]:
    bounds_open = start + len("__launch_bounds__")
    bounds_close = _matching(source, bounds_open, "(", ")")
    max_threads = _top_level_split(source[bounds_open + 1:bounds_close])[0].strip()
    params_open = source.index("(", bounds_close + 1)
    body_open = source.index("{", _matching(source, params_open, "(", ")"))
    name = " ".join(source[bounds_close + 1:params_open].split())
    return body_open + 1, f' ::fastdl_emu::check_launch_bounds("{name}", {max_threads});'


def rewrite_dynamic_shared(source: str) -> str:
    """Each `extern __shared__ [__align__(N)] T name[];` as `T* name = (T*)<the block's
    dynamic shared memory>;` on the same line."""
    out, pos = [], 0
    while (start := source.find("extern __shared__", pos)) >= 0:
        end = source.index(";", start)
        declaration = source[start + len("extern __shared__"):end]
        if not declaration.replace(" ", "").endswith("[]"):
            raise ValueError(f"cannot read a dynamic shared memory declaration: {source[start:end]!r}")
        declaration = declaration.rstrip()[:-2].rstrip()
        if "__align__(" in declaration:
            align_open = declaration.index("__align__(") + len("__align__")
            declaration = declaration[:declaration.index("__align__(")] + declaration[
                _matching(declaration, align_open, "(", ")") + 1:]
        words = declaration.split()
        name, element = words[-1], " ".join(words[:-1])
        if not name.isidentifier() or not element:
            raise ValueError(f"cannot read a dynamic shared memory declaration: {source[start:end]!r}")
        out += [source[pos:start],
                f"{element}* {name} = static_cast<{element}*>(::fastdl_emu::dynamic_shared_memory());"]
        pos = end + 1
    out.append(source[pos:])
    return "".join(out)


def _shared_declaration(source: str, start: int) -> tuple[int, str]:
    end = source.index(";", start)
    declarator = source[start + len("__shared__"):end].split("[")[0].split("=")[0]
    name = declarator.replace("*", " ").split()[-1]
    if not name.isidentifier():
        raise ValueError(f"cannot read the name of a __shared__ variable: {source[start:end]!r}")
    return end + 1, f" ::fastdl_emu::shared_memory(&{name}, sizeof({name}));"


def rewrite_source(source: str) -> str:
    """A kernels/*.cu source as the emulator compiles it (see the module's docstring):
    launches rewritten; after the `{` of each kernel declared `__launch_bounds__(N[, ...])`
    a check that its block has at most N threads (the macro expands to nothing); each
    `extern __shared__ T name[];` a pointer to the block's dynamic shared memory; after each
    other `__shared__ T name[...];` a call that declares it to the emulator, which poisons it
    as each block starts."""
    source = _insert_at_each(rewrite_launches(source), "__launch_bounds__(", _launch_bounds_check)
    return _insert_at_each(rewrite_dynamic_shared(source), "__shared__", _shared_declaration)


def build(build_dir: Path) -> Path:
    """The runner (tests/cpp/cuda_emu/runner.cpp) linked with every kernels/*.cu; built once
    per content of its sources (cached in build_dir)."""
    why = missing_tools()
    if why:
        raise RuntimeError(f"cannot build the CUDA emulator: {why}")
    sources = [*KERNEL_SOURCES, *sorted((ROOT / "kernels").rglob("*.h")), *sorted((ROOT / "kernels").rglob("*.cuh")),
               *sorted(EMU.iterdir()), Path(__file__)]
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode() + path.read_bytes())
    out_dir = build_dir / digest.hexdigest()[:16]
    runner = out_dir / "runner"
    if runner.exists():
        return runner
    out_dir.mkdir(parents=True, exist_ok=True)
    # pytest-xdist's workers (gpu_check.sh) ask at once: one builds, the others wait for it
    # and take its runner (two writing one file raced: "text file busy", a missing runner.tmp)
    with open(out_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not runner.exists():
            _build_runner(out_dir, runner)
    return runner


def _include() -> list[str]:
    return ["-I", str(ROOT / "kernels"), "-I", str(EMU), "-isystem", str(cuda_include())]


def _gxx(args: list[str], what: str) -> None:
    """g++ with FLAGS and args; raises with its messages where it fails."""
    result = subprocess.run(["g++", *FLAGS, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{result.stderr[-8000:]}")


def _link(objects: list[Path], dest: Path) -> None:
    """Links objects into dest, through dest.tmp (so that a dest that exists is whole)."""
    tmp = dest.with_name(dest.name + ".tmp")
    _gxx([*map(str, objects), "-o", str(tmp)], f"linking {dest.name}")
    tmp.rename(dest)


def _build_runner(out_dir: Path, runner: Path) -> None:
    """Compile the rewritten kernels, the emulator and the runner in out_dir and link them."""
    jobs = []
    for cu in [*KERNEL_SOURCES, EMU / "self_check.cu"]:
        rewritten = out_dir / f"{cu.stem}.emu.cpp"
        text = rewrite_source(cu.read_text())
        rewritten.write_text(f'#line 1 "{cu}"\n{text}')
        jobs.append([*_include(), "-include", str(EMU / "cuda_emu.h"), "-c", str(rewritten)])
    jobs += [[*_include(), "-c", str(EMU / "cuda_emu.cpp")], [*_include(), "-c", str(EMU / "runner.cpp")]]
    def compile_one(args):
        obj = out_dir / (Path(args[-1]).name + ".o")
        _gxx([*args, "-o", str(obj)], f"g++ on {args[-1]}")
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        _link(list(pool.map(compile_one, jobs)), runner)


def build_ucontext_variant(runner: Path) -> Path:
    """The runner `build` made, relinked with the emulator's portable fiber switch (ucontext, what
    other architectures than x86-64 run): cuda_emu.cpp compiled again with FASTDL_EMU_UCONTEXT,
    the other objects as `build` compiled them."""
    out_dir = runner.parent
    variant = out_dir / "runner-ucontext"
    with open(out_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not variant.exists():
            switch = out_dir / "cuda_emu.ucontext.o"
            _gxx([*_include(), "-DFASTDL_EMU_UCONTEXT", "-c", str(EMU / "cuda_emu.cpp"), "-o", str(switch)],
                 "g++ on cuda_emu.cpp (ucontext)")
            _link([switch, *sorted(out_dir.glob("*.emu.cpp.o")), out_dir / "runner.cpp.o"], variant)
    return variant


@dataclass
class Result:
    returncode: int
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    launches: list[str] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""


def storage_of(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The elements a 2-D view with unit column stride spans, flat, and how many they are."""
    rows, cols = t.shape
    count = 0 if t.numel() == 0 else (rows - 1) * t.stride(0) + cols
    return t.as_strided((count,), (1,), t.storage_offset()).clone(), count


def run(runner: Path, op: str, work_dir: Path, inputs: dict[str, torch.Tensor],
        outputs: dict[str, tuple[torch.dtype, int]], settings: dict[str, object],
        offsets: dict[str, int] | None = None, env: dict[str, str] | None = None,
        timeout: float = 600) -> Result:
    """Runs `op` on CPU tensors: `inputs` are 2-D (rows with unit column stride) or 1-D;
    `outputs` name (dtype, elements) of contiguous buffers the runner allocates poisoned.
    Offsets (elements) misalign a buffer's start."""
    offsets = offsets or {}
    work_dir.mkdir(parents=True, exist_ok=True)
    args = [str(runner), op]
    for name, t in inputs.items():
        flat, count = storage_of(t) if t.dim() == 2 else (t.contiguous().clone(), t.numel())
        path = work_dir / f"{name}.in"
        path.write_bytes(flat.view(torch.uint8).numpy().tobytes() if count else b"")
        args += ["--buf", f"{name}:{DTYPE_NAMES[t.dtype]}:{count}:{offsets.get(name, 0)}", "--in", f"{name}={path}"]
    for name, (dtype, count) in outputs.items():
        args += ["--buf", f"{name}:{DTYPE_NAMES[dtype]}:{count}:{offsets.get(name, 0)}",
                 "--out", f"{name}={work_dir / (name + '.out')}"]
    for key, value in settings.items():
        args += ["--set", f"{key}={int(value) if isinstance(value, bool) else value}"]
    full_env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
                "UBSAN_OPTIONS": "print_stacktrace=1", **(env or {})}
    proc = subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=timeout)
    result = Result(proc.returncode, stdout=proc.stdout, stderr=proc.stderr,
                    launches=[line[len("launch "):] for line in proc.stdout.splitlines() if line.startswith("launch ")])
    if proc.returncode == 0:
        for name, (dtype, count) in outputs.items():
            data = (work_dir / (name + ".out")).read_bytes()
            result.outputs[name] = torch.frombuffer(bytearray(data), dtype=dtype) if count else torch.empty(0, dtype=dtype)
    return result
