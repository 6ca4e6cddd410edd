"""Builds fastdl._C by driving CMake + Ninja (the pattern vLLM uses).

Build with the torch you run with: `pip install --no-build-isolation .`
(an isolated build would fetch a different torch and the binary would not match).

Environment:
  FASTDL_BUILD_CUDA=0/1   force the CUDA part off/on (default: on when torch has CUDA
                          and nvcc is found)
  FASTDL_NO_NATIVE=1      skip the native build entirely (pure-Python install)
  TORCH_CUDA_ARCH_LIST    e.g. "8.0;9.0a" (default: sm_80 and sm_90a)
  MAX_JOBS                parallel compile jobs
  FASTDL_CPU_ISA          x86-64-v3 or baseline: the CPU kernels for that ISA level only
                          (for tests; the default builds every level, picked at load time)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import setuptools
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            import torch
        except ImportError:
            raise SystemExit(
                "fastdl: building fastdl._C needs torch importable in the build environment. "
                "Install torch first, then `pip install --no-build-isolation .`"
            )
        flag = os.environ.get("FASTDL_BUILD_CUDA")
        nvcc = _find_nvcc()
        if flag is None:
            with_cuda = torch.version.cuda is not None and nvcc is not None
        else:
            with_cuda = flag == "1"
            if with_cuda and torch.version.cuda is None:
                raise SystemExit("fastdl: FASTDL_BUILD_CUDA=1 but this torch was built without CUDA")
            if with_cuda and nvcc is None:
                raise SystemExit("fastdl: FASTDL_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")

        why_cpu_only = ""
        if not with_cuda and torch.version.cuda is not None:  # a CUDA torch, yet no CUDA kernels: say why
            why_cpu_only = ": FASTDL_BUILD_CUDA=0" if flag is not None else ": no nvcc found (set CUDA_HOME)"
        try:
            build_dir = self._cmake(torch, with_cuda, nvcc, why_cpu_only)
        except subprocess.CalledProcessError:
            if not with_cuda or flag is not None:
                raise
            # CUDA kernels were not asked for by name: a toolkit that nvcc alone does not make
            # (headers or libraries missing) leaves the CPU build, with a warning, not no build
            print("fastdl: WARNING: the CUDA build failed (see above); building the CPU part alone. "
                  "FASTDL_BUILD_CUDA=1 makes this an error, FASTDL_BUILD_CUDA=0 skips the attempt.", flush=True)
            build_dir = self._cmake(torch, False, None, ": the CUDA build failed")

        built = next(build_dir.glob("_C.*.so"))
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target)

    def _cmake(self, torch, with_cuda, nvcc, why_cpu_only):
        """Configure and build fastdl._C in its own build folder (one for CPU only, one with
        CUDA); returns the folder."""
        build_dir = Path(self.build_temp).resolve() / ("cmake-cuda" if with_cuda else "cmake-cpu")
        build_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # the ninja / cmake that pip installed next to this python come first
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        args = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-GNinja",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFASTDL_BUILD_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if with_cuda:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}"]  # architectures: TORCH_CUDA_ARCH_LIST (CMakeLists.txt)
        print(f"fastdl: building fastdl._C ({'CPU + CUDA' if with_cuda else 'CPU only'}{why_cpu_only})", flush=True)
        subprocess.check_call(args, env=env)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs], env=env)
        return build_dir


ext_modules = [] if os.environ.get("FASTDL_NO_NATIVE") == "1" else [CMakeExtension("fastdl._C")]

# The license as each setuptools takes it (pyproject.toml lists it as dynamic): an SPDX
# expression from 77 on, the older free-text field before.
license_kw = ({"license_expression": "Apache-2.0"} if int(setuptools.__version__.split(".")[0]) >= 77
              else {"license": "Apache-2.0"})

setup(
    packages=find_packages(include=["fastdl", "fastdl.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    **license_kw,
)
