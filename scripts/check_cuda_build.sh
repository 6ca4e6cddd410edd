#!/usr/bin/env bash
# Compile-check the CUDA part of fastdl._C on a machine without a GPU.
#
# Builds fastdl._C against a CUDA build of torch installed in a separate venv, in build
# folders of that venv's own (the CPU build in fastdl/ is left alone): first CPU-only with
# no CUDA toolkit in sight (`cuda-only` leaves this one out), then with FASTDL_BUILD_CUDA=ON
# (kernels/ + csrc/ops); loads each and checks what it registers. Nothing runs on a GPU.
# `venv` only makes the venv (tests/test_build.py's fallback test builds with its torch).
#
#   scripts/check_cuda_build.sh [VENV=.venv-cuda] [TORCH_PIN=torch==2.14.1] [cuda-only | venv]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-cuda}
pin=${2:-torch==2.14.1}
parts=${3:-both}
tag=$(basename "$venv")
build=build/cuda-check/$tag
mkdir -p "$build"

# One process makes the venv, under a lock: the tests that use it may run at once (pytest-xdist)
(
  flock 9
  if [ ! -f "$venv/.installed" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # --no-compile: no .pyc for the ~2400 modules of torch, of which these builds import a few
    # (38 -> 25 s for torch 2.14.1)
    "$venv/bin/python" -m pip install -q --no-compile "$pin" ninja "numpy<2.4"
    touch "$venv/.installed"
  fi
) 9>"$build/venv.lock"
[ "$parts" = venv ] && exit 0
py="$venv/bin/python"

cuda_home=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$cuda_home/bin/nvcc" ]; then
  echo "check_cuda_build: no nvcc under CUDA_HOME=$cuda_home" \
    "(set CUDA_HOME to the toolkit folder that has bin/nvcc and lib64)" >&2
  exit 2
fi
# What the minimal toolkit here lacks and the CUDA torch wheel ships: headers that
# ATen/cuda/CUDAContext.h includes (cuBLAS, cuSPARSE...) and libnvrtc, which torch's
# CMake config puts on the link line.
read -r torch_cmake cu_include nvrtc < <("$py" - <<'PY'
import glob, os, torch, site
assert torch.version.cuda, "this torch has no CUDA"
def find(pattern):
    hits = [p for s in site.getsitepackages() for p in sorted(glob.glob(os.path.join(s, "nvidia", pattern)))]
    return hits[0] if hits else "-"
print(torch.utils.cmake_prefix_path, find("cu*/include"), find("cu*/lib/libnvrtc.so.*"))
PY
)

# First the CPU-only build against this CUDA torch with no CUDA toolkit in sight (no nvcc on
# PATH, no CUDA_HOME): a pip-installed torch on a machine with only the GPU driver, or
# FASTDL_BUILD_CUDA=0. torch's CMake config would insist on the toolkit; CMakeLists.txt
# does without it there. The CPU kernels for one ISA level (baseline): what is checked here is
# the configuration, and one level compiles in ~60% of the time of all three.
if [ "$parts" != cuda-only ]; then
  cpu_build=build/cuda-torch-cpu-only/$tag
  mkdir -p "$cpu_build"
  env -u CUDA_HOME -u CUDA_PATH -u CUDACXX -u CUDAToolkit_ROOT PATH="$(dirname "$py"):/usr/bin:/bin" \
    FASTDL_CPU_ISA=baseline cmake -S . -B "$cpu_build" -GNinja -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$py" -DFASTDL_BUILD_CUDA=OFF \
    >"$cpu_build/configure.log" 2>&1 || { cat "$cpu_build/configure.log"; exit 1; }
  env PATH="$(dirname "$py"):/usr/bin:/bin" FASTDL_CPU_ISA=baseline cmake --build "$cpu_build" -j "$(nproc)"
  "$py" - "$(ls "$cpu_build"/_C.*.so)" <<'PY'
import sys, torch
torch.ops.load_library(sys.argv[1])
assert not torch.ops.fastdl.native_built_with_cuda(), "the CPU-only build has CUDA"
x = torch.randn(3, 5)
assert torch.allclose(torch.ops.fastdl.softmax_rows_forward(x, False), torch.softmax(x, -1))
print(f"check_cuda_build: CPU-only build against torch {torch.__version__} (CUDA {torch.version.cuda}), "
      "no CUDA toolkit: loads and runs")
PY
fi

export PATH="$(dirname "$py"):$cuda_home/bin:$PATH"
export CUDA_HOME="$cuda_home" CUDAToolkit_ROOT="$cuda_home"
extra_include=""
[ "$cu_include" != "-" ] && extra_include="-isystem $cu_include"
extra_args=()
[ "$nvrtc" != "-" ] && extra_args+=("-DCUDA_nvrtc_LIBRARY=$nvrtc")
# FASTDL_KERNEL_OBJECTS (tests/test_build.py): kernels/ as nvcc built it already, linked as it is
# (CMakeLists.txt); set or not, it is passed, so that a folder configured with it forgets it
extra_args+=("-DFASTDL_KERNEL_OBJECTS=${FASTDL_KERNEL_OBJECTS:-}")
cmake -S . -B "$build" -GNinja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$torch_cmake" -DPython_EXECUTABLE="$py" \
  -DFASTDL_BUILD_CUDA=ON -DCMAKE_CUDA_COMPILER="$cuda_home/bin/nvcc" \
  -DCMAKE_CXX_FLAGS="$extra_include" "${extra_args[@]}" >"$build/configure.log" 2>&1 \
  || { cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j "$(nproc)"

lib=$(ls "$build"/_C.*.so)
"$py" - "$lib" <<'PY'
import sys, torch
torch.ops.load_library(sys.argv[1])
assert torch.ops.fastdl.native_built_with_cuda(), "built without FASTDL_WITH_CUDA"
for op in ("softmax_rows_forward", "softmax_rows_backward", "layer_norm_rows_forward", "layer_norm_rows_backward"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdl::{op}", key), f"fastdl::{op} has no {key} kernel"
print(f"check_cuda_build: {sys.argv[1]} built against torch {torch.__version__} (CUDA {torch.version.cuda}); "
      "CUDA kernels registered")
PY
