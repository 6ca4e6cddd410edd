#!/usr/bin/env bash
# Build, test and benchmark fastdl on a GPU machine in one call, within 10 minutes.
#
#   scripts/gpu_check.sh OUT_DIR
#
# Uses the machine's own python3 and CUDA torch (no venv, no network). Writes into
# OUT_DIR (few files, as the device tool brings back at most 8):
#   build.log      environment (nvidia-smi, versions) and the build of fastdl._C with CUDA
#   test.log       the whole test suite on the GPU
#   sanitizer.log  compute-sanitizer memcheck + racecheck over the CUDA and Triton kernels
#   bench.log      python -m fastdl.bench
#   results.tar.gz bench.json, bench.md and the plots: unpack into benchmarks/results/<device>/
# Exit status: non-zero when the build, the tests or the sanitizer failed.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
step() { echo "== $(date -u +%H:%M:%S) $*"; }

{
  step "environment"
  nvidia-smi || true
  $py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  $py -c "import triton; print('triton', triton.__version__)" || true
  git log -1 --format='commit %H %cd' 2>/dev/null || true
  step "build"
  MAX_JOBS=${MAX_JOBS:-16} FASTDL_BUILD_CUDA=1 $py -m pip install --no-build-isolation --no-deps -v -e .
} > "$out/build.log" 2>&1 || { echo "gpu_check: build failed, see build.log"; tail -40 "$out/build.log"; exit 1; }
$py -c "import fastdl; print('backends on cuda:', fastdl.available_backends('cuda'))" | tee -a "$out/build.log"

step "tests" | tee "$out/test.log"
timeout "${TEST_TIMEOUT:-270}" $py -m pytest tests -q -rs --durations=20 -p no:cacheprovider >> "$out/test.log" 2>&1 || status=1
tail -5 "$out/test.log"

step "compute-sanitizer" | tee "$out/sanitizer.log"
for tool in memcheck racecheck; do
  timeout "${SANITIZER_TIMEOUT:-90}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
    $py scripts/sanitize_kernels.py >> "$out/sanitizer.log" 2>&1 || { echo "sanitizer $tool failed" >> "$out/sanitizer.log"; status=1; }
done
tail -3 "$out/sanitizer.log"

step "benchmark" | tee "$out/bench.log"
results=$(mktemp -d)
bench_budget=${BENCH_TIMEOUT:-240}
timeout "$bench_budget" $py -m fastdl.bench --out "$results" --max-seconds $((bench_budget - 40)) ${BENCH_ARGS:-} \
  >> "$out/bench.log" 2>&1 || echo "bench exited non-zero" >> "$out/bench.log"
tar -czf "$out/results.tar.gz" -C "$results" .
tail -3 "$out/bench.log"
exit $status
