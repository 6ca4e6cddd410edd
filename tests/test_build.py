"""The native build, checked without a GPU.

* every kernels/*.cu compiles with nvcc for sm_80 and sm_90a, warnings as errors, and
  no kernel spills registers to local memory unless its source says why that is fine
  (a line `// spills accepted: <kernel name>: <reason>`);
* every kernel moves its rows in 16-byte loads and stores in some instantiation (its
  sm_90a SASS), unless its source says why not;
* every Triton kernel compiles for sm_90 at every num_warps a launch may pick, with no
  spills and, on aligned rows, 128-bit loads and stores in its SASS
  (tests/triton_compile_check.py);
* the torch-facing CUDA code (csrc/ops) compiles and links, with kernels/ as nvcc built it
  above, against a CUDA build of torch (scripts/check_cuda_build.sh; `make test` provides
  the environment) and against the GPU machine's torch (2.11); a CUDA build that fails
  without having been asked for leaves setup.py with the CPU part, which needs no CUDA
  toolkit and loads and runs;
* the CPU extension was built and loads, and links the shared libstdc++ (torch's), also
  with a g++ whose first library directory holds libstdc++.a alone (the H200 machine's);
* the CPU kernels built for the ISA levels this machine would not pick (x86-64-v3, the
  baseline) pass the CPU kernels' tests too.
"""
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ON_CI

ROOT = Path(__file__).resolve().parents[1]
KERNELS = sorted((ROOT / "kernels").glob("*.cu"))
ARCHS = ("80", "90a")

# The tests come in the order they run, the longest first (the CUDA build against torch
# 2.14.1 ~4 min with the nvcc build of kernels/ it asks for first, the Triton check ~3, the
# image's CUDA build ~2, the other ISA levels ~2, the fallback ~1), so that the worker that
# runs out first can take the later, shorter ones (pytest-xdist's worksteal). It does not
# make the end even: worksteal takes the back half of a queue, and at f0c6ca3 one worker
# still waited ~75 s on the other's last long build, as at fb3dfab before this order.


def _nvcc():
    cuda_home = os.environ.get("CUDA_HOME")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _require(tool_ok, what):
    if not tool_ok:
        if ON_CI:
            pytest.fail(f"{what} is missing on the CI machine")
        pytest.skip(f"{what} not found")


NVCC_CHECK_DIR = ROOT / "build" / "nvcc-check"


def _nvcc_build(path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """(nvcc's result, object file) of kernels/<path> built for ARCHS with warnings as errors
    and ptxas -v, once for each content of kernels/ (kept in build/nvcc-check/): the nvcc
    tests check it, and the CUDA builds link its object (FASTDL_KERNEL_OBJECTS) rather than
    compile kernels/ again. Under a lock: tests in either pytest-xdist worker may ask first."""
    nvcc = _nvcc()
    _require(nvcc, "nvcc")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    flags = ["-std=c++17", "-O3", f"-I{ROOT / 'kernels'}", *gencode, "-Werror", "all-warnings",
             "-Xcompiler", "-Wall,-Wextra,-Werror,-fPIC", "-Xptxas", "-v"]  # -fPIC: linked into fastdl._C
    digest = hashlib.sha256(" ".join([nvcc, *flags]).encode())
    for source in sorted((ROOT / "kernels").rglob("*")):
        if source.is_file():
            digest.update(str(source.relative_to(ROOT)).encode() + source.read_bytes())
    out = NVCC_CHECK_DIR / f"{path.stem}-{digest.hexdigest()[:16]}"
    out.mkdir(parents=True, exist_ok=True)
    obj, done = out / f"{path.stem}.o", out / "result.json"
    with open(out / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            cmd = [nvcc, *flags, "-c", str(path), "-o", str(obj)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:  # not kept: the next to ask compiles again
                return result, obj
            done.write_text(json.dumps([cmd, result.returncode, result.stdout, result.stderr]))
    return subprocess.CompletedProcess(*json.loads(done.read_text())), obj


def _run_check_cuda_build(venv_var: str, pin_var: str, part: str, **env: str) -> tuple[str, str, str]:
    """scripts/check_cuda_build.sh with the venv and torch pin `make test` sets in the two
    variables, asked for `part` (`venv`, `cuda-only`) with env added to the environment; it
    must succeed. Returns (venv, pin, its stdout); the script makes the venv under a lock, as
    the tests that use it may run at once."""
    venv, pin = os.environ.get(venv_var), os.environ.get(pin_var)
    _require(venv and pin, f"{venv_var} and {pin_var} (set by `make test`)")
    result = subprocess.run(["bash", str(ROOT / "scripts" / "check_cuda_build.sh"), venv, pin, part],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
    # pip's notes about unreachable index folders would bury the real error
    log = "\n".join(l for l in (result.stdout + result.stderr).splitlines() if not l.startswith("WARNING: Location"))
    assert result.returncode == 0, log[-8000:]
    return venv, pin, result.stdout


def _check_cuda_build(venv_var: str, pin_var: str, arch_list: str):
    """check_cuda_build.sh's CUDA build (`cuda-only`: its CPU-only build is the fallback
    test's), for the architectures in arch_list (TORCH_CUDA_ARCH_LIST): it must build the
    CUDA part and find its kernels registered. What it compiles is csrc/ against this torch:
    kernels/, framework-free, is linked as the nvcc check built it (for sm_80 and sm_90a,
    warnings as errors), not compiled a second and third time (~50 s of nvcc a file an
    architecture); the GPU machine's build and `make check-cuda-build` compile it with
    torch's CUDA flags.

    The CPU kernels in it are built for one ISA level, x86-64-v3 (its intrinsics kernels
    included; the baseline leaves them out): what is checked is that the code compiles and
    links against this torch, and the three multiversioned clones differ only in code
    generation, which the main build's tests and the other-ISA builds' cover (~20 s of
    csrc/cpu a build: layer_norm.cpp 31 -> 17 s against torch 2.14.1)."""
    env = {"TORCH_CUDA_ARCH_LIST": arch_list, "FASTDL_CPU_ISA": "x86-64-v3"}
    # kernels/ as the nvcc check built it, when it built: CMake then compiles csrc/ only (else
    # it compiles kernels/ too, and the nvcc tests report what failed)
    kernels = [_nvcc_build(path) for path in KERNELS]
    if all(result.returncode == 0 for result, _ in kernels):
        env["FASTDL_KERNEL_OBJECTS"] = ";".join(str(obj) for _, obj in kernels)
    _, pin, out = _run_check_cuda_build(venv_var, pin_var, "cuda-only", **env)
    assert f"built against torch {pin.split('==')[-1]}" in out, out[-8000:]
    assert "CUDA kernels registered" in out, out[-8000:]


def test_cuda_part_builds_against_cuda_torch():
    """Against the CUDA 13 build of torch on this machine's disk, for sm_80 (what nvcc
    compiles here only where the nvcc check's build of kernels/ failed)."""
    _check_cuda_build("FASTDL_CUDA_VENV", "FASTDL_CUDA_TORCH_PIN", "8.0")


def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_compile_check.py"), "--arch", "90"],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert re.search(r"compiled [1-9]\d* Triton kernel variants", result.stdout), result.stdout


def test_cuda_part_builds_against_the_gpu_image_torch():
    """The same build against the torch of the lent GPU machine's image (2.11 there), which
    differs from the dev machine's in what the C++ autograd code meets: its graph nodes
    are held in std::shared_ptr, not c10::intrusive_ptr (csrc/common/autograd.h). For sm_90a
    only, as scripts/gpu_check.sh builds on that machine's H100 / H200."""
    _check_cuda_build("FASTDL_GPU_IMAGE_VENV", "FASTDL_GPU_IMAGE_TORCH_PIN", "9.0a")


def _copy_sources(dest: Path) -> Path:
    """The tracked files of this checkout, copied to dest."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    _require(files, "git ls-files")
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


def _cpu_supports(*flags: str) -> bool:
    try:
        cpu_flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        return False
    return all(flag in cpu_flags for flag in flags)


def test_cpu_kernels_of_the_other_isa_levels(tmp_path):
    """The CPU kernels are built once per x86-64 ISA level (v4, v3, baseline) and the loader
    picks the one this CPU runs (csrc/cpu/common.h), so the suite alone tests one of them.
    Here fastdl._C is built for each other level in turn (FASTDL_CPU_ISA), in one copy of
    the sources, and the CPU kernels' tests run against it (~1-2 min a level): the second
    build recompiles the kernels' two sources, which alone take the level (CMakeLists.txt).
    The baseline build also leaves out the x86 intrinsics kernels (F16C, AVX2), as a build
    for aarch64 does: fp16 rows take the software conversions."""
    import platform

    _require(platform.machine() == "x86_64", "an x86-64 machine")
    src = _copy_sources(tmp_path / "src")
    for level in ("baseline", "x86-64-v3"):
        if level == "x86-64-v3":
            _require(_cpu_supports("avx2", "fma", "f16c", "bmi2", "movbe"), "a CPU with x86-64-v3")
        env = {**os.environ, "FASTDL_BUILD_CUDA": "0", "FASTDL_CPU_ISA": level}
        build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, capture_output=True,
                               text=True, env=env, timeout=1200)
        log = (build.stdout + build.stderr)[-6000:]
        assert build.returncode == 0, log
        assert f"CPU kernels for one ISA level only: {level}" in build.stdout + build.stderr, log
        for kernels in ("csrc/cpu/softmax.cpp", "csrc/cpu/layer_norm.cpp"):  # compiled for this level
            assert f"Building CXX object CMakeFiles/_C.dir/{kernels}.o" in build.stdout, log
        # the copy's package, not the checkout's (the editable install's finder comes after sys.path)
        where = subprocess.run([sys.executable, "-c", "import fastdl._C; print(fastdl._C.__file__)"], cwd=src,
                               capture_output=True, text=True, env=env)
        assert where.stdout.strip().startswith(str(src)), where.stdout + where.stderr
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                              "tests/test_softmax.py", "tests/test_layer_norm.py", "-k",
                              "cpu and not triton and not torch-"],
                             cwd=src, capture_output=True, text=True, env=env, timeout=1200)
        assert run.returncode == 0 and " passed" in run.stdout, (
            f"{level}:\n" + run.stdout[-6000:] + run.stderr[-3000:])


def test_failed_cuda_build_not_asked_for_falls_back_to_cpu(tmp_path):
    """setup.py against a CUDA torch whose CUDA build fails (here: an nvcc that always fails,
    as a toolkit with nvcc but not the rest would): without FASTDL_BUILD_CUDA it warns and
    builds the CPU part; with FASTDL_BUILD_CUDA=1 it fails. Runs in a copy of the sources, with
    the CUDA torch of test_cuda_part_builds_against_cuda_torch's venv (made by whichever
    comes first).

    The CPU part it builds is the CPU-only build against a CUDA torch (CMakeLists.txt's
    branch that does without torch's CMake config, which would insist on a full toolkit),
    with a toolkit of nothing but a broken nvcc in sight: it must load and run. (`make
    check-cuda-build` builds it with no toolkit at all, scripts/check_cuda_build.sh's first
    build; the tests leave that build out, the same compile a second time.)"""
    venv, _, _ = _run_check_cuda_build("FASTDL_CUDA_VENV", "FASTDL_CUDA_TORCH_PIN", "venv")
    py = str(ROOT / venv / "bin" / "python")
    src = _copy_sources(tmp_path / "src")
    toolkit = tmp_path / "cuda" / "bin"
    toolkit.mkdir(parents=True)
    (toolkit / "nvcc").write_text("#!/bin/sh\necho 'nvcc: this toolkit is broken' >&2\nexit 1\n")
    (toolkit / "nvcc").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("FASTDL_BUILD_CUDA", "CUDA_PATH", "CUDACXX")}
    # the CPU kernels for one ISA level: the fallback is what is tested, in ~60% of the build time
    env.update(CUDA_HOME=str(tmp_path / "cuda"), PATH=f"{Path(py).parent}:/usr/bin:/bin", FASTDL_CPU_ISA="baseline")

    def build(**extra):
        return subprocess.run([py, "setup.py", "build_ext", "--inplace"], cwd=src, capture_output=True, text=True,
                              env={**env, **extra})

    asked = build(FASTDL_BUILD_CUDA="1")
    assert asked.returncode != 0 and "WARNING: the CUDA build failed" not in asked.stdout
    result = build()
    log = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, log
    assert "WARNING: the CUDA build failed" in result.stdout and "CPU only: the CUDA build failed" in result.stdout, log
    built = list((src / "fastdl").glob("_C.*.so"))
    assert built, log
    check = ("import sys, torch\n"
             "torch.ops.load_library(sys.argv[1])\n"
             "assert torch.version.cuda and not torch.ops.fastdl.native_built_with_cuda()\n"
             "x = torch.randn(3, 5)\n"
             "assert torch.allclose(torch.ops.fastdl.softmax_rows_forward(x, False), torch.softmax(x, -1))\n")
    run = subprocess.run([py, "-c", check, str(built[0])], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def _cuobjdump():
    """cuobjdump from the CUDA toolkit, or the copy Triton ships."""
    nvcc = _nvcc()
    if nvcc and (Path(nvcc).parent / "cuobjdump").exists():
        return str(Path(nvcc).parent / "cuobjdump")
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:  # no triton, or no binary in it
        return shutil.which("cuobjdump")


def _accepted(source: str, what: str):
    """Kernel names the source excuses from a check: lines `// <what> accepted: <kernel>: <reason>`."""
    return set(re.findall(rf"//\s*{what} accepted:\s*(\w+)\s*:", source))


@pytest.fixture(scope="module", params=KERNELS, ids=lambda p: p.name)
def nvcc_build(request):
    """(source path, nvcc's result, object file) of one kernels/*.cu, for the tests below."""
    return request.param, *_nvcc_build(request.param)


def test_kernel_compiles_without_warnings_or_spills(nvcc_build):
    path, result, _ = nvcc_build
    assert result.returncode == 0, f"nvcc failed:\n{result.stderr[-6000:]}"

    # ptxas -v: "Compiling entry function '<mangled>' for 'sm_90a'" ... "N bytes spill stores, N bytes spill loads"
    accepted = _accepted(path.read_text(), "spills")
    function, offenders = None, []
    for line in result.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line):
            function = (m.group(1), m.group(2))
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            if (int(m.group(1)) or int(m.group(2))) and function is not None:
                if not any(name in function[0] for name in accepted):
                    offenders.append(f"{function[0]} ({function[1]}): {line.strip()}")
    assert "Compiling entry function" in result.stderr, "ptxas -v printed no kernel: no check was made"
    assert not offenders, "kernels spill registers (say why in the source if accepted):\n" + "\n".join(offenders)


def _source_and_sass(nvcc_build) -> tuple[str, str]:
    """(the kernels/*.cu source, the sm_90a SASS of its object) of an nvcc_build."""
    path, result, obj = nvcc_build
    assert result.returncode == 0, f"nvcc failed:\n{result.stderr[-6000:]}"
    cuobjdump = _cuobjdump()
    _require(cuobjdump, "cuobjdump")
    sass = subprocess.run([cuobjdump, "-sass", "-arch", "sm_90a", str(obj)], capture_output=True, text=True,
                          check=True).stdout
    return path.read_text(), sass


def test_kernels_move_rows_in_16_byte_vectors(nvcc_build):
    """Every __global__ kernel template has an instantiation whose sm_90a SASS loads with
    LDG.E.128 and stores with STG.E.128: the 16-byte moves the bandwidth targets need (the
    scalar variants for unaligned rows may lack them). Exceptions are named in the source:
    `// no 16-byte loads accepted: <kernel>: <reason>`, likewise for stores."""
    source, sass = _source_and_sass(nvcc_build)
    kernels = re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", source)
    assert kernels, f"no __global__ kernel found in {nvcc_build[0].name}"
    # each kernel's functions: the mangled names hold <length><name>
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    missing = []
    for kernel in kernels:
        bodies = [f for f in functions if f"{len(kernel)}{kernel}" in f.split("\n", 1)[0]]
        assert bodies, f"{kernel}: no function in the SASS"
        for op, what in (("LDG.E.128", "no 16-byte loads"), ("STG.E.128", "no 16-byte stores")):
            if not any(op in body for body in bodies) and kernel not in _accepted(source, what):
                missing.append(f"{kernel}: no {op} in any of its {len(bodies)} instantiations")
    assert not missing, "\n".join(missing)


def split_vector_stores(sass_body: str) -> list[tuple[str, int]]:
    """(base register, offset) of each run of 16 bytes that narrow stores (STG.E.U16 / STG.E /
    STG.E.64) from one base register cover whole, starting at one of them: a 16-byte vector
    store that nvcc split into 2-, 4- or 8-byte ones (whatever offset it gave the base)."""
    widths = {"U16": 2, None: 4, "64": 8}
    covered: dict[str, set[int]] = {}
    starts: dict[str, set[int]] = {}
    for m in re.finditer(r"STG\.E(?:\.(U16|64))?\s+desc\[\w+\]\[(R\d+)\.64(?:\+?(-?0x[0-9a-f]+))?\]", sass_body):
        offset, width = int(m.group(3) or "0", 16), widths[m.group(1)]
        covered.setdefault(m.group(2), set()).update(range(offset, offset + width))
        starts.setdefault(m.group(2), set()).add(offset)
    return [(reg, o) for reg in covered for o in sorted(starts[reg]) if all(o + b in covered[reg] for b in range(16))]


def test_split_vector_stores_are_found():
    """split_vector_stores finds a bf16 vector stored as 8 two-byte stores (SASS of the norm
    forward loop kernel at 2b1309b) and passes whole 16-byte stores and a lone scalar."""
    split = "\n".join(f"STG.E.U16 desc[UR8][R32.64+{hex(o)}], R24 ;" for o in range(0x4000, 0x4010, 2))
    assert split_vector_stores(split) == [("R32", 0x4000)]
    assert split_vector_stores("STG.E.128 desc[UR8][R20.64], R16 ;\nSTG.E desc[UR10][R6.64], R3 ;") == []
    assert split_vector_stores(split.replace("+0x400e", "+0x4010")) == []  # one short: not a whole vector
    # 2 + 3 x 4 + 2 bytes around a base 2 bytes into the vector (a softmax chunk kernel's, once)
    shifted = ("STG.E desc[UR20][R4.64+0x2], R19 ;\nSTG.E desc[UR20][R4.64+0x6], R9 ;\n"
               "STG.E desc[UR20][R4.64+0xa], R21 ;\nSTG.E.U16 desc[UR20][R4.64+-0x2], R7 ;\n"
               "STG.E.U16 desc[UR20][R4.64], R6 ;\nSTG.E.U16 desc[UR20][R4.64+0xe], R6 ;")
    assert ("R4", -2) in split_vector_stores(shifted)


def test_row_loops_store_whole_vectors(nvcc_build):
    """The kernels that walk a row in a loop (*_loop_kernel, *_block_kernel, *_write_kernel) store each 16-byte
    vector whole in their vectorised instantiations (those with a STG.E.128): nvcc split the
    unrolled write loop of the norm forward's loop kernel into 2- and 4-byte stores (2b1309b: at
    bf16 1024 x 65536 7.4x the L2 write sectors, a third of Triton's speed on the H200).
    Exceptions are named in the source: `// split stores accepted: <kernel>: <reason>`. fp64
    instantiations are left out (no bandwidth target: the norm backward loop kernel's fp64 dx
    goes out in 8-byte halves)."""
    source, sass = _source_and_sass(nvcc_build)
    accepted = _accepted(source, "split stores")
    kernels = [k for k in re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", source)
               if k.endswith(("_loop_kernel", "_block_kernel", "_write_kernel")) and k not in accepted]
    offenders, checked = [], 0
    for body in re.split(r"\n\s*Function : ", sass)[1:]:
        name = body.split("\n", 1)[0]
        if "STG.E.128" not in body or not any(f"{len(k)}{k}I" in name for k in kernels) or "_kernelId" in name:
            continue
        checked += 1
        if split := split_vector_stores(body):
            offenders.append(f"{name[:160]}: {len(split)} vectors stored in pieces, e.g. {split[0]}")
    assert checked or not kernels, f"no vectorised instantiation of {kernels} in the SASS: no check was made"
    assert not offenders, "\n".join(offenders)


def _run_cpp_check(tmp_path, name: str, expect: str):
    """Builds tests/cpp/<name>.cpp with -march=native (its loops vectorise as wide as this
    machine goes, as the kernels' clones do) and runs it; its output must hold `expect`."""
    import torch

    cxx = shutil.which("g++") or shutil.which("c++")
    _require(cxx, "a C++ compiler")
    include = Path(torch.__file__).parent / "include"
    exe = tmp_path / name
    build = subprocess.run([cxx, "-std=c++17", "-O3", "-march=native", "-fopenmp", f"-I{ROOT}", f"-I{include}",
                            str(ROOT / "tests" / "cpp" / f"{name}.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and expect in run.stdout, run.stdout[-3000:]


def test_cpu_exp_approx_accuracy(tmp_path):
    """csrc/cpu/common.h's exp_approx (the CPU softmax's exp), in a vector loop, against double
    exp over every 16th float up to 88: 1 ulp on [-87.3, 88], 0 below -88 and for -inf, NaN
    for NaN (tests/cpp/exp_approx_check.cpp). Where the CPU has AVX2, the same of
    csrc/cpu/avx2.h's exp_approx8 (the fp16 log_softmax backward's)."""
    _run_cpp_check(tmp_path, "exp_approx_check", "ok: 0 failures")


def test_half_row_conversions_match_c10(tmp_path):
    """csrc/cpu/half_rows.h's vectorised bf16 / fp16 conversions equal c10's, bit for bit:
    every 16-bit value, ties, overflow, subnormals and NaN (tests/cpp/half_rows_check.cpp)."""
    _run_cpp_check(tmp_path, "half_rows_check", "ok: 0 mismatches")


def _dynamic_section(library: Path) -> str:
    out = subprocess.run(["readelf", "-dW", str(library)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _defines_ostream_code(library: Path) -> bool:
    """Whether the library defines libstdc++'s number formatting itself (a private copy)."""
    out = subprocess.run(["nm", "-D", "--defined-only", "-C", str(library)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return "std::ostream::_M_insert<long>" in out.stdout


def test_libstdcxx_linked_shared_where_the_compiler_finds_the_archive_first(tmp_path):
    """cmake/shared_libstdcxx.cmake, which CMakeLists.txt applies to fastdl._C: on the H200
    machine a g++ wrapper whose -B directory holds libstdc++.a alone linked libstdc++ into the
    module, and every op that raised segfaulted formatting its message. Here the same kind of
    wrapper (a -B directory with this g++'s libstdc++.a) links a small module that formats a
    number: without the function it carries the archive's ostream code and needs no
    libstdc++.so.6 (the fault, reproduced); with it, it needs libstdc++.so.6 and defines none
    of that code, also where the compiler cannot say where any libstdc++ is. fastdl._C as built
    here needs libstdc++.so.6 too."""
    import platform

    gxx, cmake = shutil.which("g++"), shutil.which("cmake")
    _require(platform.system() == "Linux" and gxx and cmake and shutil.which("readelf") and shutil.which("nm"),
             "Linux with g++, cmake, readelf and nm")
    archive = subprocess.run([gxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    _require(os.path.isabs(archive), "g++'s libstdc++.a")
    (tmp_path / "archive-only").mkdir()
    (tmp_path / "archive-only" / "libstdc++.a").symlink_to(archive)
    wrapper = tmp_path / "g++"
    wrapper.write_text(f'#!/bin/sh\nexec {gxx} -B{tmp_path / "archive-only"}/ "$@"\n')
    # the same, asked where a file is, answers as g++ does when it finds none: the bare name
    # (the function then asks CMake for the system's libstdc++.so.6)
    blind = tmp_path / "g++-blind"
    blind.write_text(f'#!/bin/sh\ncase "$1" in -print-file-name=*) echo "${{1#-print-file-name=}}"; exit 0;; esac\n'
                     f'exec {gxx} -B{tmp_path / "archive-only"}/ "$@"\n')
    for script in (wrapper, blind):
        script.chmod(0o755)
    project = tmp_path / "project"
    project.mkdir()
    (project / "formats.cpp").write_text(
        '#include <sstream>\n#include <string>\n'
        'std::string formats(long dim) { std::ostringstream s; s << "dim " << dim; return s.str(); }\n')
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.22)\nproject(formats CXX)\n"
        "add_library(formats MODULE formats.cpp)\n"
        f'if(LINK_SHARED)\n  include("{ROOT / "cmake" / "shared_libstdcxx.cmake"}")\n'
        "  fastdl_link_shared_libstdcxx(formats)\nendif()\n")
    built = {}
    for name, compiler, link_shared in (("off", wrapper, "OFF"), ("on", wrapper, "ON"), ("blind", blind, "ON")):
        build = tmp_path / f"build-{name}"
        for command in ([cmake, "-S", str(project), "-B", str(build), f"-DCMAKE_CXX_COMPILER={compiler}",
                         f"-DLINK_SHARED={link_shared}"], [cmake, "--build", str(build)]):
            run = subprocess.run(command, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        built[name] = build / "libformats.so"
    assert "[libstdc++.so.6]" not in _dynamic_section(built["off"]) and _defines_ostream_code(built["off"]), (
        "the wrapper no longer links the archive: this test reproduces nothing")
    for name in ("on", "blind"):
        assert "[libstdc++.so.6]" in _dynamic_section(built[name]), (name, _dynamic_section(built[name]))
        assert not _defines_ostream_code(built[name]), name

    from fastdl import _native

    if _native.LOADED:
        module = Path(_native._C.__file__)
        assert "[libstdc++.so.6]" in _dynamic_section(module) and not _defines_ostream_code(module)


def test_cpu_extension_loaded():
    from fastdl import _native

    if not _native.LOADED and not ON_CI and os.environ.get("FASTDL_NO_NATIVE") == "1":
        pytest.skip("built with FASTDL_NO_NATIVE=1")
    assert _native.LOADED, f"fastdl._C did not load: {_native.LOAD_ERROR}"
