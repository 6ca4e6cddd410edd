"""`python -m fastdl.bench` end to end on tiny CPU sizes: tables, JSON, Markdown, plots."""
import dataclasses
import json

import pytest
import torch

from fastdl.bench import __main__ as bench_main
from fastdl.bench import layer_norm as bench_layer_norm
from fastdl.bench import softmax as bench_softmax


def test_bench_runs_and_writes_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_softmax, "CPU_ROWS", 8)
    monkeypatch.setattr(bench_softmax, "CPU_COLS", (16,))
    monkeypatch.setattr(bench_layer_norm, "CPU_ROWS", (8,))
    monkeypatch.setattr(bench_layer_norm, "CPU_HIDDEN", (32,))
    monkeypatch.setattr(bench_softmax, "HOST_SHAPE", (4, 24))
    monkeypatch.setattr(bench_layer_norm, "HOST_SHAPE", (4, 24))
    monkeypatch.setattr(bench_main, "copy_bandwidth_gbps", lambda device, quick: 10.0)
    # torch.compile is timed too, but compiling it here would take minutes: time eager twice instead
    from fastdl.bench import harness

    monkeypatch.setattr(harness, "compiled", lambda fn: fn)
    # in this process: the monkeypatched sizes do not reach isolated children
    assert bench_main.main(["--device", "cpu", "--quick", "--no-isolate", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| softmax | fwd | float32 | 8x16 | torch |" in out
    # the small host-timed cases: timed, apart from the sweep (their own direction label)
    assert "| softmax | fwd (host) | float32 | 4x24 | torch |" in out
    assert "| layer_norm | fwd+bwd (host) | float32 | 4x24 | torch |" in out
    # a mixed-precision step's call: bf16 x, fp32 parameters, under autocast
    assert "| layer_norm | fwd+bwd autocast (host) | bfloat16 | 4x24 | fastdl-cpu |" in out
    # a pre-norm block's fused add there: bf16 x beside an fp32 residual stream
    assert "| add_layer_norm | fwd+bwd autocast, fp32 residual (host) | bfloat16 | 4x24 | fastdl-cpu |" in out
    for name in ("softmax", "layer_norm"):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["environment"]["torch"] == torch.__version__
        impls = {r["impl"] for r in data["records"]}
        assert {"torch", "torch.compile"} <= impls
        assert all(r["error"] is None and r["median_ms"] > 0 and r["gbps"] > 0 for r in data["records"]), data
        assert not list(tmp_path.glob("*.partial")), "a finished run leaves no checkpoint"
        # each record says how it was timed: the sweep interleaved on the CPU, the small cases as calls
        assert {r["timing"] for r in data["records"] if r["direction"].endswith("(host)")} == {"host"}
        assert {r["timing"] for r in data["records"] if not r["direction"].endswith("(host)")} == {"cpu"}
        md = (tmp_path / f"{name}.md").read_text()
        assert md.count("\n|") >= 3
        # the CPU targets name 4096x4096, which this tiny run does not time
        assert "## Targets" in md and "NOT RUN" in md
        assert data["targets"] and all(t["status"] == "NOT RUN" for t in data["targets"])
    for png in ("softmax", "layer_norm", "rms_norm", "add_layer_norm"):
        assert (tmp_path / f"{png}.png").stat().st_size > 1000


def test_run_cases_checkpoints_after_each_case(tmp_path):
    """run_cases hands the records so far to on_case after every case; the bench's checkpoint
    writes them to <op>.json.partial, which a process that dies leaves behind."""
    from fastdl.bench.harness import Case, Impl, run_cases

    def case(cols):
        x = torch.randn(4, cols)
        return Case("softmax", "fwd", torch.float32, (4, cols), 4 * cols * 4 * 2,
                    lambda: [Impl("torch", lambda: torch.softmax(x, -1)), Impl("torch.compile", lambda: x * 2)])

    path, write = bench_main.checkpoint(tmp_path, "softmax", {"device": "cpu"})
    seen = []

    def on_case(records):
        seen.append(len(records))
        write(records)

    records = run_cases([case(8), case(16)], torch.device("cpu"), 10.0, quick=True, show_progress=False,
                        on_case=on_case)
    assert seen == [2, 4] and len(records) == 4
    saved = json.loads(path.read_text())
    assert path.name == "softmax.json.partial" and len(saved["records"]) == 4
    assert saved["environment"]["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_timing_leaves_out_the_host():
    """time_device_ms: a call whose host side takes 2 ms and whose kernel moves 512 MiB (~0.15 ms
    on an H100 / H200) is timed at the kernel's time (CUDA graph replay), not the host's; a call
    that syncs, which no graph can hold, falls back to per-call events."""
    import time

    from fastdl.bench.harness import time_device_ms

    x = torch.ones(64 << 20, device="cuda")

    def slow_host_call():
        time.sleep(0.002)
        return x + 1

    median, p20, p80, how = time_device_ms(slow_host_call, quick=True)
    assert how == "graph" and p20 <= median <= p80
    assert 0.01 < median < 1.0, median  # the kernel's time, not the host's 2 ms
    median, _, _, how = time_device_ms(lambda: (x + 1).sum().item(), quick=True)
    assert how == "events" and median > 0
    torch.randn(8, device="cuda")  # the failed capture left the device's random numbers as they were


def test_host_timing_counts_each_call():
    """time_host_ms: wall time a call when calls run back to back, quantiles in order."""
    import time

    from fastdl.bench.harness import time_host_ms

    median, p20, p80 = time_host_ms(lambda: time.sleep(0.0005), torch.device("cpu"), quick=True)
    assert 0.5 <= median < 5 and p20 <= median <= p80


def test_cpu_timing_interleaves_implementations(monkeypatch):
    """time_cpu_interleaved_ms: each fn timed in turn, round after round, inside its scope; a
    failing fn gets its exception in its place and the others are still timed."""
    import contextlib
    import time

    from fastdl.bench import harness

    monkeypatch.setattr(harness, "CPU_ROUNDS", 3)
    order, scoped = [], []

    @contextlib.contextmanager
    def scope(name):
        scoped.append(name)
        yield

    def sleeper(name, seconds):
        def fn():
            if not order or order[-1] != name:
                order.append(name)
            time.sleep(seconds)
        return fn

    def broken():
        raise RuntimeError("boom")

    fast, slow, failed = harness.time_cpu_interleaved_ms(
        [sleeper("a", 0.0005), sleeper("b", 0.002), broken], scopes=[lambda: scope("a"), lambda: scope("b"),
                                                                     lambda: scope("c")])
    assert order == ["a", "b"] * 3 and scoped == ["a", "b", "c", "a", "b", "a", "b"]
    assert isinstance(failed, RuntimeError)
    for median, p20, p80 in (fast, slow):
        assert p20 <= median <= p80
    assert 0.5 <= fast[0] < slow[0] and slow[0] >= 2


def test_time_budget_skips_the_rest(tmp_path, monkeypatch):
    from fastdl.bench.harness import run_cases

    cases = bench_softmax.cases(torch.device("cpu"), quick=True)
    records = run_cases(cases, torch.device("cpu"), 10.0, quick=True, max_seconds=0)
    assert records and all(r.error == "skipped: over the time budget" for r in records)


def test_sigterm_writes_what_was_timed(tmp_path, monkeypatch, capsys):
    """gpu_check.sh ends a bench that runs past its share with SIGTERM: the case in flight and
    those after it (of every op) are recorded as skipped, and the results of the cases timed
    before are written, not lost with the process."""
    import dataclasses
    import os
    import signal

    from fastdl.bench import OPS, harness

    monkeypatch.setattr(bench_softmax, "CPU_ROWS", 8)
    monkeypatch.setattr(bench_softmax, "CPU_COLS", (16, 32))
    monkeypatch.setattr(bench_softmax, "HOST_SHAPE", (4, 24))
    monkeypatch.setattr(bench_main, "copy_bandwidth_gbps", lambda device, quick: 10.0)
    monkeypatch.setattr(harness, "compiled", lambda fn: fn)
    monkeypatch.setattr(harness, "_stop_requested", False)
    original_cases = OPS["softmax"].cases
    killed_at = 2

    def cases(device, quick=False):
        out = original_cases(device, quick)

        def terminated():
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises Stopped right after this returns
            return out[killed_at].impls()

        out[killed_at] = dataclasses.replace(out[killed_at], impls=terminated)
        return out

    monkeypatch.setattr(OPS["softmax"], "cases", cases)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = bench_main.main(["--device", "cpu", "--quick", "--no-isolate", "--ops", "softmax", "layer_norm",
                                "--out", str(tmp_path)])
        # `timeout` sends a second SIGTERM (to the process group): ignored, not the default's exit
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        handler(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 0
    assert "stopped by SIGTERM" in capsys.readouterr().out
    records = json.loads((tmp_path / "softmax.json").read_text())["records"]
    key = lambda r: (r["direction"], tuple(r["shape"]))  # noqa: E731
    order = list(dict.fromkeys(key(r) for r in records))  # the cases, in the order they ran
    assert len(order) > killed_at + 1
    for r in records:
        if order.index(key(r)) < killed_at:
            assert r["error"] is None and r["median_ms"] > 0, r
        else:
            assert r["error"] == "skipped: the run was stopped (SIGTERM)", r
    # the op after the stop is not timed at all, but its (skipped) results are written
    norm_records = json.loads((tmp_path / "layer_norm.json").read_text())["records"]
    assert norm_records and all(r["error"] == "skipped: the run was stopped (SIGTERM)" for r in norm_records)


def test_isolated_case_process(tmp_path):
    """On the CPU each case runs in a fresh process (`--only-case`) that prints its records."""
    import subprocess
    import sys

    index = next(i for i, c in enumerate(bench_softmax.cases(torch.device("cpu"), quick=True)) if c.direction == "bwd")
    child = subprocess.run([sys.executable, "-m", "fastdl.bench", "--ops", "softmax", "--device", "cpu", "--quick",
                            "--only-case", str(index), "--copy-gbps", "10"], capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    records = json.loads(child.stdout.strip().splitlines()[-1])
    assert {r["impl"] for r in records} >= {"torch", "torch.compile"}
    assert all(r["op"] == "softmax" and r["direction"] == "bwd" and r["error"] is None for r in records)


def test_targets_take_the_best_fastdl_backend_per_case():
    from fastdl.bench.harness import Record
    from fastdl.bench.targets import Target, check, markdown

    def rec(impl, cols, pct, dtype="bfloat16", error=None):
        return Record("softmax", "fwd", dtype, [4096, cols], impl, 1.0, 1.0, 1.0, 1.0, pct, 1.0, 1.0, error=error)

    records = [
        rec("torch", 1024, 99.0),  # not fastdl: never counts
        rec("fastdl-cuda", 1024, 80.0), rec("fastdl-triton", 1024, 95.0),  # best of the two: met
        rec("fastdl-cuda", 4096, 85.0), rec("fastdl-triton", 4096, 99.0, error="boom"),  # errors never count
        rec("fastdl-cuda", 256, 10.0),  # shorter than min_cols
        rec("fastdl-cuda", 1024, 10.0, dtype="float32"),  # another dtype
    ]
    bandwidth = Target("bw", "softmax", "fwd", "cuda", ("bfloat16",), "pct_of_copy", 90.0, min_cols=1024)
    other_device = Target("cpu", "softmax", "fwd", "cpu", ("float32",), "vs_eager", 1.0)
    absent = Target("none", "softmax", "bwd", "cuda", ("bfloat16",), "pct_of_copy", 85.0)
    verdicts = check([bandwidth, other_device, absent], records, "cuda")
    assert [v.target.text for v in verdicts] == ["bw", "none"]
    bw, none = verdicts
    assert (bw.met, bw.cases, bw.status) == (1, 2, "MISSED")
    assert bw.worst == "4096x4096 bfloat16 fastdl-cuda: 85.00 % of copy"
    assert (none.cases, none.status) == (0, "NOT RUN")
    met = check([bandwidth], records[:3], "cuda")[0]
    assert (met.met, met.cases, met.status) == (1, 1, "MET")
    # max_cols: the 4096-column case (85%) left out, the 1024 one met
    capped = Target("capped", "softmax", "fwd", "cuda", ("bfloat16",), "pct_of_copy", 90.0, min_cols=1024,
                    max_cols=2048)
    assert check([capped], records, "cuda")[0].status == "MET"
    assert "| bw | MISSED | 1/2 |" in markdown(verdicts)
    # rows=: the sweep's cases only, not an extra case of other rows (the vocabulary softmax)
    few_rows = Record("softmax", "fwd", "bfloat16", [8, 262144], "fastdl-triton", 1.0, 1.0, 1.0, 1.0, 20.0, 1.0, 1.0)
    sweep_only = dataclasses.replace(bandwidth, rows=4096)
    assert check([sweep_only], records[:3] + [few_rows], "cuda")[0].status == "MET"
    assert check([bandwidth], records[:3] + [few_rows], "cuda")[0].status == "MISSED"


def test_every_bench_module_declares_checkable_targets():
    from fastdl.bench import OPS
    from fastdl.bench.targets import METRICS

    for name, module in OPS.items():
        assert module.TARGETS, name
        ops = {case.op for case in module.cases(torch.device("cpu"))}
        for t in module.TARGETS:
            assert t.metric in METRICS and t.device in ("cuda", "cpu") and t.minimum > 0
            assert t.op in ops, t


def test_gpu_sweep_times_the_autocast_norms_after_bf16():
    """The GPU sweep (listed here without one: cases only build their inputs when run) has
    device-timed autocast cases, bf16 x under torch.autocast, right after the bf16 cases, and
    counts their least traffic: x read in bf16, y written in fp32 (6 bytes a value), and
    backward dy in fp32, x and dx in bf16 (8 more); the fused add reads x and residual and
    writes the sum in bf16 and y in fp32 (10), and backward reads dy in fp32, the sum's
    gradient and the sum and writes dx in bf16 (10 more). Beside an fp32 residual stream the
    fused add reads x in bf16 and the residual in fp32 and writes the sum and y in fp32 (14),
    and backward reads dy, the sum's gradient and the sum and writes the residual's gradient
    in fp32 and x's in bf16 (18 more)."""
    cases = bench_layer_norm.cases(torch.device("cuda"))
    mixed = [i for i, c in enumerate(cases)
             if c.direction.startswith(("fwd autocast", "fwd+bwd autocast")) and c.timing != "host"]
    assert {cases[i].op for i in mixed} == {"layer_norm", "rms_norm", "add_layer_norm"} and len(mixed) == 24
    assert all(cases[i].dtype == torch.bfloat16 for i in mixed)
    last_bf16 = max(i for i, c in enumerate(cases)
                    if c.dtype == torch.bfloat16 and i not in mixed and c.shape != bench_layer_norm.GPU_LONG_SHAPE)
    assert mixed == list(range(last_bf16 + 1, last_bf16 + 25))
    bytes_a_value = {("add_layer_norm", ""): (10, 20), ("add_layer_norm", ", fp32 residual"): (14, 32)}
    for i in mixed:
        rows, n = cases[i].shape
        direction, _, residual = cases[i].direction.partition(" autocast")
        fwd, fwd_bwd = bytes_a_value.get((cases[i].op, residual), (6, 14))
        assert cases[i].bytes_moved == (fwd if direction == "fwd" else fwd_bwd) * rows * n


def test_gpu_sweep_ends_with_long_norm_rows_the_targets_leave_out():
    """After every dtype's sweep the GPU run times the issue's longest hidden size (bf16, the loop
    kernels' rows), layer_norm and the fused add both ways; no target covers it (the issue's
    targets name the sweep's sizes)."""
    from fastdl.bench.targets import _covers
    from fastdl.bench.harness import Record

    cases = bench_layer_norm.cases(torch.device("cuda"))
    long_rows = [c for c in cases if c.shape == bench_layer_norm.GPU_LONG_SHAPE]
    assert cases[-len(long_rows):] == long_rows and len(long_rows) == 4
    assert {(c.op, c.direction, c.dtype) for c in long_rows} == {
        (op, d, torch.bfloat16) for op in ("layer_norm", "add_layer_norm") for d in ("fwd", "fwd+bwd")}
    for c in long_rows:
        record = Record(c.op, c.direction, "bfloat16", list(c.shape), "fastdl-cuda", 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
        assert not any(_covers(t, record) for t in bench_layer_norm.TARGETS), c


def test_cpu_sweep_times_the_fused_add_of_an_fp32_residual_stream():
    """The CPU sweep times, after the 16-bit cases, a pre-norm block's fused add under CPU
    autocast at the sweep's size: bf16 x beside an fp32 residual, counting 14 bytes a value
    forward and 18 more backward, as the GPU sweep does."""
    cases = bench_layer_norm.cases(torch.device("cpu"))
    wide = [c for c in cases if c.direction.endswith(" autocast, fp32 residual")]
    assert [(c.op, c.direction, c.dtype, c.shape) for c in wide] == [
        ("add_layer_norm", d + " autocast, fp32 residual", torch.bfloat16, bench_layer_norm.CPU_HALF_SHAPE)
        for d in ("fwd", "fwd+bwd")]
    rows, n = bench_layer_norm.CPU_HALF_SHAPE
    assert [c.bytes_moved for c in wide] == [14 * rows * n, 32 * rows * n]
    assert cases[-2:] == wide


def test_gpu_sweep_times_the_fp32_softmax_of_bf16_after_bf16():
    """The GPU softmax sweep times a bf16 x's softmax in fp32 (torch.softmax(x, dtype=float32)),
    forward and forward + backward, after the bf16 cases, counting x in bf16 and y in fp32 (6
    bytes a value) and backward dy and y in fp32 and dx in bf16 (10 more)."""
    cases = bench_softmax.cases(torch.device("cuda"))
    mixed = [i for i, c in enumerate(cases) if c.direction.endswith(" to fp32")]
    assert len(mixed) == 6 and all(cases[i].dtype == torch.bfloat16 for i in mixed)
    assert mixed == list(range(mixed[0], mixed[0] + 6)) and cases[mixed[-1] + 1].dtype == torch.float16
    for i in mixed:
        rows, n = cases[i].shape
        assert cases[i].bytes_moved == (6 if cases[i].direction == "fwd to fp32" else 16) * rows * n


def test_cpu_sweep_times_the_fp32_softmax_of_bf16_last():
    """The CPU softmax sweep ends with a bf16 x's softmax in fp32 at the 16-bit cases' size,
    forward and forward + backward, counted as the GPU sweep counts them."""
    cases = bench_softmax.cases(torch.device("cpu"))
    rows, n = bench_softmax.CPU_HALF_SHAPE
    assert [(c.direction, c.dtype, c.shape, c.bytes_moved) for c in cases if c.direction.endswith(" to fp32")] == [
        ("fwd to fp32", torch.bfloat16, (rows, n), 6 * rows * n), ("fwd+bwd to fp32", torch.bfloat16, (rows, n),
                                                                  16 * rows * n)]
    assert [c.direction for c in cases[-2:]] == ["fwd to fp32", "fwd+bwd to fp32"]


def test_pytest_benchmark_suites_run():
    """Every bench op has benchmarks/bench_<op>.py, and the suites run (each case once,
    untimed; torch.compile left out here for time)."""
    import os
    import re
    import subprocess
    import sys

    from fastdl.bench import OPS
    from fastdl.bench.harness import ROOT

    for name in OPS:
        assert (ROOT / "benchmarks" / f"bench_{name}.py").is_file(), name
    # as a user runs it: no Triton interpreter (4096-row cases would take minutes in it)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                             "--benchmark-disable", "-k", "not compile"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 2 * len(OPS), result.stdout[-2000:]


def test_preference_ranks_backends_case_by_case(tmp_path, capsys):
    from fastdl.bench import preference
    from fastdl.bench.harness import Record

    def rec(op, impl, cols, ms, direction="fwd", dtype="bfloat16", error=None):
        return Record(op, direction, dtype, [4096, cols], impl, ms, ms, ms, 1.0, 1.0, error=error)

    records = [
        rec("layer_norm", "fastdl-triton", 1024, 1.0), rec("layer_norm", "fastdl-cuda", 1024, 2.0),
        # add_layer_norm shares layer_norm's entry; rms_norm has its own
        rec("add_layer_norm", "fastdl-triton", 1024, 4.0), rec("add_layer_norm", "fastdl-cuda", 1024, 1.0),
        rec("rms_norm", "fastdl-triton", 1024, 1.0), rec("rms_norm", "fastdl-cuda", 1024, 3.0),
        rec("layer_norm", "fastdl-cuda", 4096, 1.0), rec("layer_norm", "fastdl-triton", 4096, 9.0, error="boom"),
        rec("layer_norm", "torch", 1024, 0.1),  # not a fastdl backend: never ranked
        rec("layer_norm", "fastdl-triton", 64, 3.0, direction="fwd (host)"),
        rec("layer_norm", "fastdl-cuda", 64, 1.0, direction="fwd (host)"),
    ]
    ranking = preference.rank(records)
    (cuda, triton) = ranking[("layer_norm", "bfloat16")]
    assert cuda[:2] == ("cuda", 1) and triton[:2] == ("triton", 1) and cuda[3] == triton[3] == 2
    assert abs(cuda[2] - 2 ** 0.5) < 1e-9 and abs(triton[2] - 2.0) < 1e-9  # geomean of (2, 1) and (1, 4)
    assert preference.rank(records)[("rms_norm", "bfloat16")][0][:2] == ("triton", 1)
    assert preference.rank(records, host=True)[("layer_norm", "bfloat16")][0][:2] == ("cuda", 1)
    (tmp_path / "layer_norm.json").write_text(json.dumps({"records": [r.__dict__ for r in records]}))
    assert preference.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| layer_norm | bfloat16 | cuda | 1/2 | 1.41 |" in out and "small inputs (host-timed)" in out


def test_merge_keeps_earlier_cases_and_lists_runs(tmp_path, monkeypatch):
    """--merge: a run in parts adds to <op>.json; cases not timed again are kept, a case
    only skipped this time keeps its earlier timings, the environment lists every run."""
    from fastdl.bench import __main__ as bench_cli
    from fastdl.bench.harness import Record

    def rec(cols, impl, ms, error=None, dtype="float32"):
        return Record("softmax", "fwd", dtype, [8, cols], impl, ms, ms, ms, 1.0, 1.0, error=error)

    earlier = [rec(16, "torch", 1.0), rec(32, "torch", 2.0), rec(64, "torch", 3.0)]
    path = tmp_path / "softmax.json"
    path.write_text(json.dumps({"environment": {"date": "d0", "commit": "c0", "copy_bandwidth_gbps": 1.0},
                                "records": [r.__dict__ for r in earlier]}))
    now = [rec(32, "torch", 5.0), rec(64, "-", float("nan"), error="skipped: over the time budget"),
           rec(16, "torch", 9.0, dtype="bfloat16")]
    order = [("softmax", "fwd", "bfloat16", (8, 16))] + [("softmax", "fwd", "float32", (8, c)) for c in (16, 32, 64)]
    merged, env = bench_cli.merge_previous(path, now, {"date": "d1", "commit": "c1", "copy_bandwidth_gbps": 2.0},
                                           order)
    assert [(r.dtype, r.shape[1], r.median_ms) for r in merged] == [
        ("bfloat16", 16, 9.0), ("float32", 16, 1.0), ("float32", 32, 5.0), ("float32", 64, 3.0)]
    assert [run["commit"] for run in env["runs"]] == ["c0", "c1"]
    # end to end: --dtypes picks cases, --merge writes the union
    monkeypatch.setattr(bench_softmax, "CPU_ROWS", 8)
    monkeypatch.setattr(bench_softmax, "CPU_COLS", (16,))
    monkeypatch.setattr(bench_softmax, "HOST_SHAPE", (4, 24))
    monkeypatch.setattr(bench_cli, "copy_bandwidth_gbps", lambda device, quick: 10.0)
    from fastdl.bench import harness

    monkeypatch.setattr(harness, "compiled", lambda fn: fn)
    args = ["--device", "cpu", "--quick", "--no-isolate", "--ops", "softmax", "--out", str(tmp_path)]
    assert bench_cli.main(args + ["--dtypes", "bfloat16", "--merge"]) == 0  # no bf16 case on the CPU: none timed
    assert bench_cli.main(args + ["--dtypes", "float32", "--merge"]) == 0
    data = json.loads(path.read_text())
    shapes = {tuple(r["shape"]) for r in data["records"]}
    assert {(8, 16), (8, 32), (8, 64), (4, 24)} <= shapes and len(data["environment"]["runs"]) == 3


def test_tune_times_each_knob_value_and_puts_it_back(tmp_path):
    """python -m fastdl.bench.tune --quick: a row per case, a time per value, the knobs as
    they were afterwards."""
    import fastdl
    from fastdl.bench import tune
    from fastdl.triton import softmax as triton_softmax

    # its quick cases are Triton's: on the CPU under the interpreter (CI), else on the GPU
    device = next((d for d in ("cpu", "cuda") if "triton" in fastdl.available_backends(d)), None)
    if device is None:
        pytest.skip("triton runs on no device here")
    before = triton_softmax.SPLIT_PROGRAMS_PER_SM
    out = tmp_path / "tune.md"
    assert tune.main(["--quick", "--device", device, "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| softmax") or
            line.startswith("| layer_norm")]
    expected = tune.cases(torch.device(device), quick=True)
    assert expected and len(rows) == len(expected)
    for row, case in zip(rows, expected):
        assert case.knob.name in row
        assert row.count("%)") == len(case.knob.values), row  # every value timed: "ms (GB/s, N%)"
    assert triton_softmax.SPLIT_PROGRAMS_PER_SM == before


def test_tune_match_picks_cases_by_label():
    """--match keeps the cases whose label holds one of its strings, and only those."""
    import fastdl
    from fastdl.bench import tune

    everything = tune.all_cases(quick=False)
    picked = tune.cases(torch.device("cpu"), quick=False, match=["TILE_PARAM_SUMS", "16384 triton.layer_norm.PARAM"])
    wanted = [c for c in everything if c.backend in fastdl.available_backends("cpu") and
              (c.knob.name.endswith("TILE_PARAM_SUMS") or (c.shape == (4096, 16384) and ".PARAM_" in c.knob.name))]
    assert picked == wanted and len(picked) == (7 if "triton" in fastdl.available_backends("cpu") else 0)


def test_tune_knobs_exist():
    """Every knob tune.py sweeps is still a constant of its module or a variable the CUDA
    launchers read: a renamed constant fails here, not on a lent GPU."""
    from pathlib import Path

    from fastdl.bench import tune

    kernels = Path(__file__).resolve().parents[1] / "kernels"
    cuda_source = "\n".join(p.read_text() for p in [*kernels.glob("*.cu"), *kernels.glob("common/*.cuh"),
                                                    *kernels.glob("common/*.h")])
    for quick in (True, False):
        for case in tune.all_cases(quick):
            if case.knob.name.startswith("env:"):
                assert f'env_knob("{case.knob.name[4:]}"' in cuda_source, case.knob.name
            else:
                assert isinstance(case.knob.default(), int), case.knob.name
            assert case.op in tune.FNS


def test_profile_script_runs_its_cases(capsys):
    """scripts/profile_kernels.py (gpu_check.sh's "profile" step, under Nsight Compute): each
    case runs at toy sizes on the CPU, those of a backend not here said to be skipped."""
    import importlib.util
    from pathlib import Path

    import fastdl

    path = Path(__file__).resolve().parents[1] / "scripts" / "profile_kernels.py"
    spec = importlib.util.spec_from_file_location("profile_kernels", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    here = fastdl.available_backends("cpu")
    for label, backend, _, quick, _ in script.CASES:
        name = f"{label} {'x'.join(map(str, quick))} on {backend or 'torch'}"
        ran = backend is None or backend in here
        assert (f"profile_kernels: {name}\n" in out) == ran, (name, out)
        assert (f"profile_kernels: {name}: backend {backend} not available here, skipped" in out) != ran
    assert f"profile_kernels: {sum(b is None or b in here for _, b, _, _, _ in script.CASES)} cases" in out


_NCU_LOG = """\
profile_kernels: layer_norm fwd+bwd bf16 4096x1024 on cuda
==PROF== Profiling "norm_forward_tile_kernel" - 0: 0%....50%....100% - 18 passes
==PROF== Profiling "sum_partial_rows_kernel" - 1: 0%....50%....100% - 18 passes
profile_kernels: softmax fwd bf16 1024x50257 on triton
==PROF== Profiling "_softmax_forward_loop_kernel" - 2: 0%....50%....100% - 18 passes
profile_kernels: 2 cases
==PROF== Disconnected from process 7502
  void fastdl::<unnamed>::norm_forward_tile_kernel<__nv_bfloat16, float, 128, 8>(const T1 *, long) (4096, 1, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    Memory Throughput                 %        34.25
    DRAM Throughput                   %        19.96
    Duration                         us         8.77
    Section: Memory Workload Analysis
    Memory Throughput                          Gbyte/s       959.12
    L2 Hit Rate                                      %        53.76
    Registers Per Thread             register/thread              30
    Achieved Occupancy                        %        80.82
  void fastdl::<unnamed>::sum_partial_rows_kernel<float, __nv_bfloat16>(const T1 *, long) (32, 2, 1)x(32, 8, 1), Context 1, Stream 7, Device 0, CC 9.0
    Duration                         ms         1.50
    Memory Throughput                          Tbyte/s         3.49
    Grid Size                                                  64
  _softmax_forward_loop_kernel (1024, 1, 1)x(256, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Duration                         us        85.41
    Registers Per Thread             register/thread              64
"""


def test_profile_summary_reads_an_ncu_log(tmp_path):
    """scripts/profile_summary.py joins each kernel of ncu's report (printed after the process
    ends) to the case that launched it, and keeps its shape, registers and metrics in common
    units (ms -> us, Tbyte/s -> GB/s); a metric ncu did not print stays empty."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "profile_summary.py"
    spec = importlib.util.spec_from_file_location("profile_summary", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.parse(_NCU_LOG)
    assert [r["case"] for r in rows] == ["layer_norm fwd+bwd bf16 4096x1024 on cuda"] * 2 + [
        "softmax fwd bf16 1024x50257 on triton"]
    assert [r["kernel"] for r in rows] == ["norm_forward_tile_kernel<bf16, float, 128, 8>",
                                           "sum_partial_rows_kernel<float, bf16>", "_softmax_forward_loop_kernel"]
    assert [r["grid x block"] for r in rows] == ["4096 x 128", "32x2 x 32x8", "1024 x 256"]
    first, second, third = rows
    assert (first["time us"], first["DRAM %"], first["memory GB/s"], first["registers"]) == (8.77, 19.96, 959.12, 30)
    assert (first["L2 hit %"], first["occupancy %"]) == (53.76, 80.82)
    assert second["time us"] == 1500.0 and second["memory GB/s"] == 3490.0 and "registers" not in second
    assert third["registers"] == 64 and "DRAM %" not in third
    log = tmp_path / "profile.log"
    log.write_text(_NCU_LOG)
    table = script.markdown(rows, log.name)
    assert ("| 1 | layer_norm fwd+bwd bf16 4096x1024 on cuda | sum_partial_rows_kernel<float, bf16> | 32x2 x 32x8 |"
            in table)
    empty = tmp_path / "empty.log"
    empty.write_text("==PROF== Disconnected from process 1\n")
    assert script.main([str(empty)]) == 1  # no report: an error, not an empty table
