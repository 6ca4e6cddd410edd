#!/usr/bin/env bash
# Build, test and benchmark fastdl on a GPU machine (CUDA torch, no network).
#
#   scripts/gpu_check.sh OUT_DIR      # build, test, sanitize, bench: all inside GPU_CHECK_SECONDS
#   STEPS="build bench" BENCH_MERGE=1 BENCH_OPS=layer_norm BENCH_ARGS="--dtypes float16 float32" \
#     scripts/gpu_check.sh OUT_DIR   # a sweep in parts: adds to benchmarks/results/<device>/ as committed
#   STEPS="build tune" scripts/gpu_check.sh OUT_DIR   # the launchers' knobs, each value timed
#   STEPS="build profile" scripts/gpu_check.sh OUT_DIR   # Nsight Compute over the slow kernels
#
# The whole run keeps inside GPU_CHECK_SECONDS (default 570: one call of a lent GPU, whose
# limit is 600 s): the build at most BUILD_TIMEOUT (default 300), the tests at most TEST_TIMEOUT
# (default 200) and each test 120 s (pytest-timeout), the sanitizer SANITIZER_TIMEOUT (default 90,
# its four runs at once), the benchmark what is left (or BENCH_SECONDS), the tuner TUNE_TIMEOUT (default 240).
# A step never runs past the budget: one that gets too little is cut short or skipped, and says so.
#
# FASTDL_COMMIT=<hash> names the commit the results record where the copy has no .git.
#
# Uses the machine's own python3 and CUDA torch (no venv, no network). Writes into
# OUT_DIR (few files: the device tool brings back at most 8):
#   build.log       environment (nvidia-smi, versions), the build of fastdl._C with CUDA, and
#                   scripts/diagnose_exceptions.py (does a C++ exception kill the process?)
#   test.log        the whole test suite on the GPU (pytest-xdist when installed), a line a test
#   sanitizer.log   compute-sanitizer memcheck + racecheck over every GPU kernel (CUDA, Triton)
#   bench.log       python -m fastdl.bench, one run per op, each with its share of the seconds,
#                   then python -m fastdl.bench.preference (the fastest backend per op and dtype)
#   results.tar.gz  <op>.json, <op>.md and plots: unpack into benchmarks/results/<device>/
#   tune.md         python -m fastdl.bench.tune (step "tune", not in the default steps)
#   profile.log     ncu over scripts/profile_kernels.py's cases (step "profile", not in the
#                   default steps): speed of light, occupancy, launch, warp stalls, memory
#   profile.md      its table, a kernel a line (scripts/profile_summary.py): commit it beside tune.md
# Exit status: non-zero when the build, the tests or the sanitizer failed (a failed build does not
# stop the steps after it: the triton and torch backends run without fastdl._C).
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
steps=${STEPS:-build test sanitize bench}
export PYTHONUNBUFFERED=1
status=0
step() { echo "== $(date -u +%H:%M:%S) $* ($(left) s of the budget left)"; }
budget=${GPU_CHECK_SECONDS:-570}
left() { echo $(( budget - SECONDS )); }  # SECONDS: bash's count since the script started
# at most $1 seconds, and never past the budget less $2 seconds kept for the steps after
# (at least 1: `timeout 0` would mean no limit at all)
cap() { local n=$(( $(left) - ${2:-0} )); (( n > $1 )) && n=$1; (( n > 1 )) && echo "$n" || echo 1; }
has_step() { [[ " $steps " == *" $1 "* ]]; }

if has_step build; then
  {
    step "environment"
    nvidia-smi || true
    $py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    $py -c "import triton; print('triton', triton.__version__)" || true
    git log -1 --format='commit %H %cd' 2>/dev/null || echo "commit ${FASTDL_COMMIT:-unknown (no .git here)}"
    step "build"
    export MAX_JOBS=${MAX_JOBS:-16} FASTDL_BUILD_CUDA=1
    # this machine's architecture only (sm_90a on an H100): half the compile time of the default two
    if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
      TORCH_CUDA_ARCH_LIST=$($py -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))") \
        && export TORCH_CUDA_ARCH_LIST && echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
    fi
    # (BUILD_TIMEOUT, default 300 s: a build that hangs must not take the whole call)
    timeout "$(cap "${BUILD_TIMEOUT:-300}")" $py -m pip install --no-build-isolation --no-deps -v -e . || {
      step "pip install -e failed; building in place with setup.py"
      timeout "$(cap "${BUILD_TIMEOUT:-300}")" $py setup.py build_ext --inplace
    }
  } > "$out/build.log" 2>&1 || {
    # the triton and torch backends need no fastdl._C: their tests and benchmark still run
    echo "gpu_check: BUILD FAILED, see build.log; going on without the native backends" | tee -a "$out/build.log"
    tail -40 "$out/build.log"
    status=1
  }
  $py -c "import fastdl; print('backends on cuda:', fastdl.available_backends('cuda'))" 2>&1 | tee -a "$out/build.log"
  # the first GPU run (cc56307) saw every C++ exception out of fastdl._C segfault the process:
  # which cases die, and the native backtrace of the first (cuda-gdb), into build.log
  if [[ "${DIAGNOSE:-1}" == 1 ]]; then
    step "C++ exceptions" >> "$out/build.log"
    limit=$(cap 100 300)  # 300 s kept for the steps after (the tests run the script too, without gdb)
    if (( limit < 10 )); then
      echo "gpu_check: no time left for the C++ exceptions check: NOT RUN" >> "$out/build.log"
    elif ! timeout "$limit" $py scripts/diagnose_exceptions.py >> "$out/build.log" 2>&1; then
      echo "gpu_check: a C++ exception killed a process (or the check was cut off): see build.log" \
        | tee -a "$out/build.log"
    fi
  fi
fi

if has_step test; then
  step "tests" | tee "$out/test.log"
  parallel=""
  $py -c "import xdist" 2>/dev/null && parallel="-n ${TEST_WORKERS:-14}"  # Triton JITs: 14 of 16 cores
  # tests/test_build.py (nvcc, Triton sm_90 and CUDA-torch compile checks) and the CUDA
  # emulator's tests run in CI on every commit, without a GPU: here the GPU runs the kernels
  # themselves, and those would take minutes of the lent one
  # -v: a line for each test as it ends, so a run cut short still says what passed and failed;
  # a test that hangs is ended after 120 s (pytest-timeout; thread: also out of a CUDA call)
  # the steps after keep their time: the sanitizer's (its tools at once), three minutes of benchmark
  later=0
  has_step sanitize && later=$(( later + ${SANITIZER_TIMEOUT:-90} ))
  has_step bench && later=$(( later + 150 ))
  limit=$(cap "${TEST_TIMEOUT:-200}" "$later")
  (( limit < 30 )) && limit=30  # the tests matter more than what comes after them
  # the (backend, device) tests on CUDA tensors only (FASTDL_TEST_DEVICES, tests/conftest.py):
  # their CPU cases run in CI on every commit (FASTDL_TEST_DEVICES= , empty: every case)
  FASTDL_TEST_DEVICES=${FASTDL_TEST_DEVICES-cuda} timeout "$limit" $py -m pytest tests -v -rfEs --durations=15 -p no:cacheprovider $parallel \
    -o timeout=120 -o timeout_method=thread --ignore tests/test_build.py \
    --ignore tests/test_cuda_kernels_emulated.py \
    >> "$out/test.log" 2>&1
  rc=$?
  (( rc == 124 )) && echo "gpu_check: the tests were cut off after ${limit} s: NOT ALL RUN" | tee -a "$out/test.log"
  (( rc != 0 )) && status=1
  grep -E "^(FAILED|ERROR)" "$out/test.log" | head -30
  tail -3 "$out/test.log"
fi

if has_step sanitize; then
  step "compute-sanitizer" | tee "$out/sanitizer.log"
  # memcheck and racecheck, each over the CUDA C++ kernels and over the Triton ones: four
  # processes at once (the machine has 16 cores; the sanitized kernels are slow, not the GPU
  # busy), each cut off after the same SANITIZER_TIMEOUT. One after the other, the 2nd H200 run
  # got through the CUDA kernels and Triton's fp32 in 75 s of memcheck, the CUDA ones in racecheck.
  limit=$(cap "${SANITIZER_TIMEOUT:-90}" 30)
  if (( limit < 20 )); then
    echo "sanitizer: no time left in the budget: NOT CHECKED" | tee -a "$out/sanitizer.log"
    status=1
  else
    parts=$(mktemp -d)
    for tool in memcheck racecheck; do
      for backend in cuda triton; do
        ( FASTDL_SANITIZE_BACKENDS=$backend timeout "$limit" compute-sanitizer --tool "$tool" --error-exitcode 9 \
            $py scripts/sanitize_kernels.py > "$parts/$tool-$backend.log" 2>&1
          echo $? > "$parts/$tool-$backend.rc" ) &
      done
    done
    wait
    for tool in memcheck racecheck; do
      for backend in cuda triton; do
        echo "== $tool $backend" >> "$out/sanitizer.log"
        cat "$parts/$tool-$backend.log" >> "$out/sanitizer.log"
        rc=$(cat "$parts/$tool-$backend.rc")
        # what this tool reported before it ended (or was cut off): compute-sanitizer's error lines
        if grep -qE '^========= (Invalid|Error|Program hit|Race|Warning: Race)' "$parts/$tool-$backend.log"; then
          rc=9
        fi
        case $rc in
          0) ;;
          124) echo "sanitizer $tool $backend: cut off after ${limit} s, no error so far: PARTLY CHECKED" \
                 "(progress lines above)" | tee -a "$out/sanitizer.log" ;;
          *) echo "sanitizer $tool $backend failed" | tee -a "$out/sanitizer.log"; status=1 ;;
        esac
      done
    done
    # some runtimes (gVisor) refuse the sanitizer outright: say so, it found nothing
    if grep -q "Device not supported" "$out/sanitizer.log"; then
      echo "compute-sanitizer cannot run on this machine (Device not supported): NOT CHECKED" | tee -a "$out/sanitizer.log"
    fi
    rm -rf "$parts"
  fi
  grep -E "^sanitize_kernels: ran" "$out/sanitizer.log"
fi

if has_step profile; then
  step "profile" | tee "$out/profile.log"
  ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /usr/local/cuda-*/bin/ncu /opt/nvidia/nsight-compute/*/ncu \
    2>/dev/null | head -1)
  limit=$(cap "${PROFILE_TIMEOUT:-150}")
  if [[ -z "$ncu" ]]; then
    echo "profile: no ncu on this machine: NOT RUN" | tee -a "$out/profile.log"
  elif (( limit < 20 )); then
    echo "profile: no time left in the budget: NOT RUN" | tee -a "$out/profile.log"
  else
    # each case's one profiled call (cudaProfilerStart / Stop); the clocks as they are (METHOD.md)
    timeout "$limit" "$ncu" --clock-control none --profile-from-start off --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
      $py scripts/profile_kernels.py >> "$out/profile.log" 2>&1 \
      || echo "profile: ncu exited non-zero or was cut off (the cases before are above)" | tee -a "$out/profile.log"
  fi
  grep -c "^profile_kernels: " "$out/profile.log" | sed 's/^/profile: case lines: /'
  $py scripts/profile_summary.py "$out/profile.log" > "$out/profile.md" || rm -f "$out/profile.md"
fi

if has_step bench; then
  step "benchmark" | tee "$out/bench.log"
  results=$(mktemp -d)
  merge=""
  if [[ -n "${BENCH_MERGE:-}" ]]; then  # start from this device's committed results and add to them
    slug=$($py -c "import torch; from fastdl.bench.harness import device_slug; print(device_slug(torch.device('cuda')))")
    cp benchmarks/results/"$slug"/*.json "$results"/ 2>/dev/null || true
    merge="--merge"
  fi
  ops=${BENCH_OPS:-softmax layer_norm}
  n_ops=$(wc -w <<< "$ops")
  # the benchmark takes what the budget has left, or BENCH_SECONDS when given, less 20 s for
  # the preference table, 35 s an op for a case started just before its share ends, and the tuner's
  reserve=$(( 20 + 35 * n_ops ))
  has_step tune && reserve=$(( reserve + ${TUNE_TIMEOUT:-240} ))
  seconds=$(cap "${BENCH_SECONDS:-100000}" "$reserve")
  share=$(( seconds / n_ops ))
  echo "benchmark: ${share} s an op" | tee -a "$out/bench.log"
  if (( share < 20 )); then
    echo "benchmark: no time left in the budget: NOT RUN" | tee -a "$out/bench.log"
    ops=""
  fi
  for op in $ops; do
    # each op gets its share; cases past it are recorded as skipped (most important dtypes first)
    # past its share and 20 s, SIGTERM: the bench records the cases left as skipped and writes
    # what it timed (KILL 15 s later if it has not ended)
    timeout -k 15 $((share + 20)) $py -m fastdl.bench --ops "$op" --out "$results" --max-seconds "$share" $merge \
      ${BENCH_ARGS:-} >> "$out/bench.log" 2>&1
    case $? in
      0) ;;
      124) echo "bench $op: stopped at the end of its share; the cases left are recorded as skipped" >> "$out/bench.log" ;;
      *) echo "bench $op exited non-zero: results.tar.gz keeps $op.json.partial, the cases timed before it" \
           >> "$out/bench.log" ;;
    esac
  done
  tar -czf "$out/results.tar.gz" -C "$results" .
  # which fastdl backend wins, per PREFERENCE entry and dtype: the evidence for backends.py
  $py -m fastdl.bench.preference "$results" >> "$out/bench.log" 2>&1 || true
  tail -3 "$out/bench.log"
fi
if has_step tune; then
  step "tune" | tee "$out/tune.log"
  limit=$(cap "${TUNE_TIMEOUT:-240}")
  if (( limit < 20 )); then
    echo "tune: no time left in the budget: NOT RUN" | tee -a "$out/tune.log"
  else
    # TUNE_ARGS: e.g. "--match layer_norm --match PACKED" (the cases whose label holds either)
    timeout "$limit" $py -m fastdl.bench.tune --out "$out/tune.md" ${TUNE_ARGS:-} >> "$out/tune.log" 2>&1 \
      || echo "tune exited non-zero or was cut off (a failed value shows its error in the table)" >> "$out/tune.log"
  fi
  tail -3 "$out/tune.log"
fi
exit $status
