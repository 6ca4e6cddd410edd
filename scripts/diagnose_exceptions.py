"""Where does a C++ exception kill the process? (scripts/gpu_check.sh runs this after the build.)

On the H200 machine (torch 2.11.0+cu130, g++ 13.3) the first GPU run saw the process segfault
whenever a fastdl._C op raised (TORCH_CHECK), where the same sources raise RuntimeError on the
development machines. Each case below runs in a fresh process and says whether a RuntimeError
came back or the process died; the first case that dies is run again under cuda-gdb (there is
no gdb on that machine) for the native backtrace.

    python3 scripts/diagnose_exceptions.py [--no-gdb]
"""
from __future__ import annotations

import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TORCH_ERROR = "torch.mm(torch.ones(2, 3), torch.ones(2, 3))"  # raised inside libtorch
FASTDL_ERROR = "torch.ops.fastdl.softmax_rows_forward(torch.randn(2, 3, 4), False)"  # inside fastdl._C
LOAD_C = "torch.ops.load_library(glob.glob(os.path.join(ROOT, 'fastdl', '_C*.so'))[0])"
CUDA_INIT = "torch.ones(1, device='cuda').sum().item()"
TRITON_CALL = ("import fastdl\nwith fastdl.use_backend('triton'): "
               "fastdl.ops.softmax(torch.randn(4, 8, device='cuda')).sum().item()")
CUDA_OP_CALL = ("import fastdl\nwith fastdl.use_backend('cuda'): "
                "fastdl.ops.softmax(torch.randn(4, 8, device='cuda')).sum().item()")

# name -> (set-up lines, the raising line)
CASES = {
    "torch raises, nothing else loaded": ("", TORCH_ERROR),
    "fastdl._C raises, loaded bare (no fastdl Python)": (LOAD_C, FASTDL_ERROR),
    "torch raises, fastdl._C loaded bare": (LOAD_C, TORCH_ERROR),
    "fastdl._C raises, after import fastdl": ("import fastdl", FASTDL_ERROR),
    "torch raises, after CUDA init": (CUDA_INIT, TORCH_ERROR),
    "fastdl._C raises, after CUDA init": (LOAD_C + "\n" + CUDA_INIT, FASTDL_ERROR),
    "fastdl._C raises, after a cuda-backend call": (CUDA_OP_CALL, FASTDL_ERROR),
    "torch raises, after a triton launch": (TRITON_CALL, TORCH_ERROR),
    "fastdl._C raises, after a triton launch": (TRITON_CALL, FASTDL_ERROR),
    "fastdl._C's CUDA op raises": ("import fastdl",
                                   "torch.ops.fastdl.softmax_rows_forward(torch.randn(2, 3, 4, device='cuda'), False)"),
    # fastdl.raise_for_test: which way of raising dies (csrc/bindings.cpp)
    "fastdl._C raises TORCH_CHECK (backtrace captured)": (LOAD_C, "torch.ops.fastdl.raise_for_test(0)"),
    "fastdl._C raises c10::Error without a backtrace": (LOAD_C, "torch.ops.fastdl.raise_for_test(1)"),
    "fastdl._C raises std::runtime_error": (LOAD_C, "torch.ops.fastdl.raise_for_test(2)"),
    "fastdl._C raises c10::Error w/o backtrace, after CUDA init": (LOAD_C + "\n" + CUDA_INIT,
                                                                   "torch.ops.fastdl.raise_for_test(1)"),
    "fastdl._C raises std::runtime_error, after CUDA init": (LOAD_C + "\n" + CUDA_INIT,
                                                             "torch.ops.fastdl.raise_for_test(2)"),
    # caught inside fastdl._C (csrc/python.cpp's HANDLE_TH_ERRORS), not in libtorch_python
    "fastdl._C's Python function raises, caught in fastdl._C": (
        "import fastdl", "fastdl._C.softmax_eager(torch.randn(2, 3), 5, False)"),
}


def program(setup: str, raising: str) -> str:
    return textwrap.dedent(f"""\
        import glob, os, sys, torch
        ROOT = {str(ROOT)!r}
        sys.path.insert(0, ROOT)
        """) + setup + "\n" + textwrap.dedent(f"""\
        try:
            {raising}
        except RuntimeError as exc:
            print('RAISED:', str(exc).splitlines()[0][:100])
        else:
            print('NO ERROR')
        """)


def run_case(setup: str, raising: str, timeout: float = 60) -> tuple[int, str]:
    try:
        result = subprocess.run([sys.executable, "-c", program(setup, raising)], capture_output=True, text=True,
                                timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return -999, "timed out"
    out = (result.stdout + result.stderr).strip().splitlines()
    return result.returncode, out[-1] if out else ""


def native_backtrace(setup: str, raising: str) -> str:
    gdb = shutil.which("cuda-gdb") or shutil.which("gdb")
    if gdb is None:
        return "no cuda-gdb / gdb here"
    script = ROOT / "build" / "diagnose_case.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text(program(setup, raising))
    try:
        result = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 40", "-ex", "info sharedlibrary",
                                 "--args", sys.executable, str(script)],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"{gdb}: timed out"
    keep = [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith(("#", "Thread", "Program", "0x", "From")) or "SIGSEGV" in line or "signal" in line]
    return "\n".join(keep[-120:])


def main() -> int:
    import torch

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"GPU {torch.cuda.is_available()}")
    libs = glob.glob(str(ROOT / "fastdl" / "_C*.so"))
    if not libs:
        print("no fastdl/_C*.so: build first")
        return 1
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx:
        print(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0])
    # a compiler wrapper script (one that adds -static-libstdc++, say) shows its text
    print("CXX =", os.environ.get("CXX"), " CC =", os.environ.get("CC"))
    # the last: the compiler CMake took on the H200 machine
    for name in dict.fromkeys(("c++", "g++", os.environ.get("CXX") or "c++", "/opt/gcc/bin/g++")):
        path = shutil.which(name)
        if path:
            real = os.path.realpath(path)
            head = Path(real).read_bytes()[:2000]
            print(f"{name} -> {real}" + (":\n  " + "\n  ".join(head.decode(errors="replace").splitlines()[:15])
                                          if head.startswith(b"#!") else ""))
    # which C++ runtime and unwinder the extension uses (none NEEDED: linked in statically),
    # what compiled it, and whether it has an .eh_frame_hdr lookup table
    for tool, args, wanted in (("ldd", [libs[0]], ("libstdc", "libgcc", "libgomp", "libc10.")),
                               ("readelf", ["-dW", libs[0]], ("NEEDED",)),
                               ("readelf", ["-lW", libs[0]], ("EH_FRAME",)),
                               ("readelf", ["-p", ".comment", libs[0]], ("GCC", "clang", "NVIDIA"))):
        if shutil.which(tool):
            out = subprocess.run([tool, *args], capture_output=True, text=True).stdout
            print(f"{tool} {args[0]}:", "\n  ".join(l.strip() for l in out.splitlines() if any(w in l for w in wanted)))
    died = None
    runnable = {name: case for name, case in CASES.items()
                if torch.cuda.is_available() or "cuda" not in case[0] + case[1]}
    # each case in its own process, all at once (a process mostly waits for torch's import)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(runnable)) as pool:
        results = dict(zip(runnable, pool.map(lambda case: run_case(*case), runnable.values())))
    for name, (setup, raising) in CASES.items():
        if name not in results:
            print(f"{name:60s} skipped: no GPU")
            continue
        rc, last = results[name]
        verdict = "ok" if rc == 0 and last.startswith("RAISED") else f"DIED (exit {rc})"
        print(f"{name:60s} {verdict}: {last[:110]}")
        if verdict != "ok" and died is None:
            died = (setup, raising)
    if died and "--no-gdb" not in sys.argv:
        print("\nnative backtrace of the first case that died:")
        print(native_backtrace(*died))
    return 1 if died else 0


if __name__ == "__main__":
    sys.exit(main())
