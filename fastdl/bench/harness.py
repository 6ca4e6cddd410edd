"""The benchmark harness behind `python -m fastdl.bench`.

Every case is timed side by side in one run: torch eager, torch.compile, each fastdl
backend that runs here. Medians and 20/80% quantiles; GB/s from the bytes each input
is read and each output written once, against the device-to-device copy bandwidth
measured in the same run.

Timing: on a GPU the device's time alone, from CUDA graph replays (time_device_ms: each call
after an L2 flush, the flushes' own time taken off), so that a call the host is slow to issue
does not count its launch; `triton.testing.do_bench` (CUDA events around each call, which do
count it when the GPU waits for the host) where an implementation cannot be captured. On the
CPU `torch.utils.benchmark`. Host-timed cases (calls back to back) measure the eager call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

import fastdl

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Impl:
    """One implementation of a case: a name ("torch", "torch.compile", "fastdl-cuda"...),
    a function of no arguments that runs it once, and for fastdl the backend in force
    while it is timed."""

    name: str
    fn: Callable[[], object]
    backend: str | None = None


@dataclasses.dataclass
class Case:
    op: str  # "softmax"
    direction: str  # "fwd" / "bwd"
    dtype: torch.dtype
    shape: tuple
    bytes_moved: int  # each input read once, each output written once
    impls: Callable[[], list]  # builds the Impls (allocates inputs) when the case runs
    timing: str = "device"  # "device": the work itself (time_ms); "host": calls back to back (time_host_ms)


# Direction label of host-timed cases ("fwd (host)"): kept apart from the sweep's
# directions, so the bandwidth targets and plots never take them.
HOST = " (host)"


@dataclasses.dataclass
class Record:
    op: str
    direction: str
    dtype: str
    shape: list
    impl: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    gbps: float
    pct_of_copy: float
    vs_eager: float | None = None  # eager time / this time: > 1 is faster than eager
    vs_compile: float | None = None
    error: str | None = None
    # how it was timed: "graph" (device time, CUDA graph replay), "events" (do_bench: host
    # stalls included), "host" (calls back to back), "cpu"; "" in runs recorded before the field
    # (the H200 run at cc56307 timed its GPU cases as "events")
    timing: str = ""


def compiled(fn):
    """torch.compile(fn) with static shapes and a fresh cache (no recompile limit, no stale graph)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def fastdl_backends(device: torch.device) -> list[str]:
    """The fastdl backends to time on device (torch is timed as itself)."""
    return [b for b in fastdl.available_backends(device.type) if b != "torch"]


def device_slug(device: torch.device) -> str:
    """The folder under benchmarks/results/ for this device: h100, h200, a100, cpu..."""
    if device.type == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    for known in ("h100", "h200", "a100", "l40s", "b200", "gb200"):
        if known in name.lower().replace(" ", ""):
            return known
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def time_ms(fn: Callable[[], object], device: torch.device, quick: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds: on a GPU the device's time (time_device_ms)."""
    if device.type == "cuda":
        return time_device_ms(fn, quick)[:3]
    from torch.utils import benchmark

    fn()  # warm up
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2 if quick else 1.0)
    times = sorted(m.times)
    if len(times) >= 2:
        q = statistics.quantiles(times, n=10, method="inclusive")
        p20, p80 = q[1], q[7]
    else:
        p20 = p80 = times[0]
    return m.median * 1e3, p20 * 1e3, p80 * 1e3


GRAPH_CALLS = 20  # calls in one CUDA graph, each after an L2 flush


@functools.lru_cache(maxsize=None)
def _l2_flush_buffer(device_index: int) -> torch.Tensor:
    """Twice the device's L2 (H100 / H200: 50 / 60 MiB): reading it evicts whatever a call left there."""
    l2_bytes = getattr(torch.cuda.get_device_properties(device_index), "L2_cache_size", 0) or (64 << 20)
    return torch.zeros(2 * l2_bytes // 4, dtype=torch.int32, device=f"cuda:{device_index}")


def _flush_l2(flush: torch.Tensor) -> None:
    """Evicts the L2 by reading twice its size, writing nothing. A flush that writes (zero_) leaves
    the L2 full of its own dirty lines: the next call pays their write-back, and the call's own
    output, left dirty in the L2, is written back by the next flush in place of the flush's, which
    the flushes-alone graph pays too, so up to an L2 of a call's writes went uncounted (the H200 run
    at 3b332bb: rms_norm fwd under autocast, 4096 x 4096 bf16 -> fp32, at 5.1 TB/s, over the HBM's
    4.8). A reading flush evicts the call's dirty lines, their write-back falls in the calls'
    graph, and it leaves clean lines behind."""
    torch.amax(flush)


def _end_generator_capture(device_index: int) -> None:
    """After a failed capture, the device's default generator as if no capture had begun.

    torch.cuda.graph registers the default CUDA generator when a capture begins and releases it
    in capture_end after cudaStreamEndCapture; a capture that a sync invalidated fails in that
    call, before the release (torch 2.11), and the generator stays capturing: every later random
    draw on the device raises "Offset increment outside graph capture encountered unexpectedly"
    (the H200 run at 3b332bb: each test after the fallback's test in its worker). A copy of its
    state (seed and offset) holds no capture."""
    generator = torch.cuda.default_generators[device_index]
    if hasattr(generator, "graphsafe_set_state"):  # torch >= 2.4
        generator.graphsafe_set_state(generator.clone_state())


def _time_events_ms(fn: Callable[[], object], quick: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) ms of fn timed call by call between CUDA events (triton's do_bench,
    an L2 flush before each call): any wait of the GPU for the host counts."""
    import triton.testing

    q = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, quantiles=[0.5, 0.2, 0.8])
    return float(q[0]), float(q[1]), float(q[2])


def time_device_ms(fn: Callable[[], object], quick: bool = False) -> tuple[float, float, float, str]:
    """(median, p20, p80, how) milliseconds of GPU time a call, host time excluded.

    Two CUDA graphs are captured: GRAPH_CALLS L2 flushes alone, and the same flushes each
    followed by a call of fn. Each replay is timed with CUDA events, the two alternately, and a
    call's time is (with calls - flushes alone) / GRAPH_CALLS for each pair of replays: the GPU
    never waits for the host inside a graph, and the flush's own time cancels, while the
    write-back of what the call wrote falls in the next flush (_flush_l2) and counts.
    how = "graph". An fn that cannot be captured (one that syncs, say) falls back to
    _time_events_ms, whose per-call events include any wait for the host: how = "events"."""
    device_index = torch.cuda.current_device()
    flush = _l2_flush_buffer(device_index)
    # warm-up on a side stream, as torch.cuda.graph wants: compiles, autotuning, first allocations
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    flushes, calls = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(flushes):
            for _ in range(GRAPH_CALLS):
                _flush_l2(flush)
        with torch.cuda.graph(calls):
            for _ in range(GRAPH_CALLS):
                _flush_l2(flush)
                fn()
    except Exception:  # not capturable: time it call by call instead
        torch.cuda.synchronize()
        _end_generator_capture(device_index)
        return (*_time_events_ms(fn, quick), "events")

    def replay_ms(graph: torch.cuda.CUDAGraph) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    replay_ms(flushes), replay_ms(calls)  # the first replay uploads the graph
    samples = sorted((replay_ms(calls) - replay_ms(flushes)) / GRAPH_CALLS for _ in range(5 if quick else 25))
    del calls, flushes
    q = statistics.quantiles(samples, n=10, method="inclusive")
    if q[1] <= 0:  # lost in the flushes' noise (a call of well under a microsecond): no ratio to draw from it
        raise RuntimeError(f"device time too small to tell from the L2 flush's: "
                           f"median {statistics.median(samples):.2g} ms")
    return statistics.median(samples), q[1], q[7], "graph"


CPU_ROUNDS = 5  # a CPU case's implementations are timed in turn, this many rounds each


def time_cpu_interleaved_ms(fns: list[Callable[[], object]], quick: bool = False,
                            scopes: list[Callable[[], contextlib.AbstractContextManager]] | None = None
                            ) -> list[tuple[float, float, float] | Exception]:
    """(median, p20, p80) ms for each of fns, timed in turn for CPU_ROUNDS rounds (each
    ~0.2 s), fns[i] inside scopes[i]() when given: on a shared CPU machine a slow spell
    then falls on every implementation of a case alike, where timing each for one second
    after the other let it fall on one. An fn that raises gets its exception in its place
    and is not timed again."""
    from torch.utils import benchmark

    times: list[list[float] | Exception] = [[] for _ in fns]
    for _ in range(1 if quick else CPU_ROUNDS):
        for i, fn in enumerate(fns):
            if isinstance(times[i], Exception):
                continue
            try:
                with scopes[i]() if scopes else contextlib.nullcontext():
                    fn()  # warm up (and, first round, fail before timing)
                    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
                    times[i].extend(timer.blocked_autorange(min_run_time=0.2).times)
            except Exception as exc:  # reported by the caller, as one implementation's failure
                times[i] = exc
    results = []
    for t in times:
        if isinstance(t, Exception):
            results.append(t)
            continue
        t = sorted(t)
        q = statistics.quantiles(t, n=10, method="inclusive") if len(t) >= 2 else [t[0]] * 9
        results.append((statistics.median(t) * 1e3, q[1] * 1e3, q[7] * 1e3))
    return results


def time_host_ms(fn: Callable[[], object], device: torch.device, quick: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds a call when calls run back to back, as in a training loop:
    for small inputs this is the host's time (Python, dispatch, launch), which device timing with a
    cache flush before each call hides. Wall clock over a batch of calls, then a synchronize."""
    import time

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3 if quick else 20):
        fn()
    sync()
    calls = 10 if quick else 200
    samples = []
    for _ in range(3 if quick else 15):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / calls * 1e3)
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]


def copy_bandwidth_gbps(device: torch.device, quick: bool = False) -> float:
    """Device-to-device copy, bytes read + written per second: the ceiling for memory-bound ops.

    On a GPU the copy is timed call by call with CUDA events (_time_events_ms; a 512 MiB copy
    takes ~0.25 ms, far over any host wait), not in a CUDA graph: captured, copy_'s cudaMemcpyAsync
    becomes a graph memcpy node, which ran at 2.76 TB/s on the H200 (run at 3b332bb) where the
    same copy launched directly ran at 4.17 TB/s (run at cc56307; KINDS.md: ~4.3) and the kernels
    under test reached 4.2."""
    n_bytes = (512 << 20) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    median = _time_events_ms(copy, quick)[0] if device.type == "cuda" else time_ms(copy, device, quick)[0]
    return 2 * n_bytes / (median * 1e-3) / 1e9


def git_commit() -> str:
    if os.environ.get("FASTDL_COMMIT"):
        return os.environ["FASTDL_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device, copy_gbps: float) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "device_slug": device_slug(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "copy_bandwidth_gbps": round(copy_gbps, 1),
    }
    if device.type == "cpu":
        env["threads"] = torch.get_num_threads()
        try:
            model = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
            env["device"] = model[0].split(":", 1)[1].strip() if model else env["device"]
        except OSError:
            pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


class Progress:
    """tqdm when it is installed, else a plain counter on stderr."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self._bar = None
        self.total, self.done, self.desc = total, 0, desc

    def update(self, label: str):
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
        else:
            print(f"\r{self.desc} [{self.done}/{self.total}] {label:60s}", end="", file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        else:
            print(file=sys.stderr)


class Stopped(BaseException):
    """SIGTERM while timing (gpu_check.sh's timeout): the cases left are recorded as skipped
    and the results written, instead of the run ending with nothing."""


_stop_requested = False


def stop_on_sigterm() -> None:
    """From now on, SIGTERM raises Stopped in the main thread and every case after it is
    skipped. Only the first: `timeout` sends two (to the command, then to its process
    group), and the second must not cut the writing of the results short. KILL still ends it."""
    import signal

    def handler(signum, frame):
        global _stop_requested
        if not _stop_requested:
            _stop_requested = True
            raise Stopped()

    signal.signal(signal.SIGTERM, handler)


def stop_requested() -> bool:
    return _stop_requested


STOPPED = "the run was stopped (SIGTERM)"  # why the cases after a SIGTERM are skipped


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: the name records and --dtypes use."""
    return str(dtype).replace("torch.", "")


def case_label(case: Case) -> str:
    """"softmax fwd bfloat16 4096x1024": a case in the progress bar and in messages."""
    return f"{case.op} {case.direction} {dtype_name(case.dtype)} {'x'.join(map(str, case.shape))}"


def skipped_record(case: Case, why: str) -> Record:
    return Record(case.op, case.direction, dtype_name(case.dtype), list(case.shape), "-", float("nan"),
                  float("nan"), float("nan"), 0.0, 0.0, error=f"skipped: {why}")


def run_cases(cases: list[Case], device: torch.device, copy_gbps: float, quick: bool = False,
              max_seconds: float | None = None, show_progress: bool = True,
              on_case: Callable[[list[Record]], None] | None = None) -> list[Record]:
    """Time every case; past max_seconds, or once Stopped, the remaining cases are recorded as
    skipped. on_case(records so far) after each case (a checkpoint)."""
    import time

    records = []
    progress = Progress(len(cases), "fastdl.bench") if show_progress else None
    start = time.time()
    for case in cases:
        if stop_requested():
            records.append(skipped_record(case, STOPPED))
        elif max_seconds is not None and time.time() - start > max_seconds:
            records.append(skipped_record(case, "over the time budget"))
        else:
            try:
                records.extend(_time_case(case, device, copy_gbps, quick))
            except Stopped:  # this case's timings are dropped: it did not finish
                records.append(skipped_record(case, STOPPED))
        if progress:
            progress.update(case_label(case))
        if on_case:
            on_case(records)
    if progress:
        progress.close()
    return records


def _time_case(case: Case, device: torch.device, copy_gbps: float, quick: bool) -> list[Record]:
    """A record for each implementation of the case, with its ratios to torch eager and torch.compile."""
    dtype = dtype_name(case.dtype)
    case_records = []
    try:
        impls = case.impls()
    except torch.OutOfMemoryError as exc:  # skip a case the device cannot hold
        impls = []
        print(f"\n{case_label(case)}: skipped, out of memory ({exc})", file=sys.stderr)
    interleaved = {}
    if device.type == "cpu" and case.timing == "device" and impls:
        scopes = [functools.partial(fastdl.use_backend, impl.backend or "auto") for impl in impls]
        interleaved = dict(zip([impl.name for impl in impls],
                               time_cpu_interleaved_ms([impl.fn for impl in impls], quick, scopes)))
    for impl in impls:
        try:
            if impl.name in interleaved:
                result = interleaved[impl.name]
                if isinstance(result, Exception):
                    raise result
                (median, p20, p80), how = result, "cpu"
            else:
                with fastdl.use_backend(impl.backend or "auto"):
                    if case.timing == "host":
                        (median, p20, p80), how = time_host_ms(impl.fn, device, quick), "host"
                    else:  # a GPU's device time
                        median, p20, p80, how = time_device_ms(impl.fn, quick)
            gbps = case.bytes_moved / (median * 1e-3) / 1e9
            case_records.append(Record(case.op, case.direction, dtype, list(case.shape), impl.name,
                                       median, p20, p80, gbps, 100 * gbps / copy_gbps, timing=how))
        except Exception as exc:  # one implementation failing must not end the run
            case_records.append(Record(case.op, case.direction, dtype, list(case.shape), impl.name,
                                       float("nan"), float("nan"), float("nan"), 0.0, 0.0,
                                       error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
    del impls
    by_name = {r.impl: r for r in case_records if r.error is None}
    for r in case_records:
        if r.error is None:
            if "torch" in by_name:
                r.vs_eager = by_name["torch"].median_ms / r.median_ms
            if "torch.compile" in by_name:
                r.vs_compile = by_name["torch.compile"].median_ms / r.median_ms
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return case_records


def _fmt(v, spec):
    return "-" if v is None or v != v else format(v, spec)


def markdown_table(records: list[Record]) -> str:
    lines = ["| op | dir | dtype | shape | impl | median ms | GB/s | % of copy | vs eager | vs compile | timing |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in records:
        if r.error:
            lines.append(f"| {r.op} | {r.direction} | {r.dtype} | {'x'.join(map(str, r.shape))} | {r.impl} | "
                         f"error: {r.error} | | | | | |")
            continue
        lines.append(
            f"| {r.op} | {r.direction} | {r.dtype} | {'x'.join(map(str, r.shape))} | {r.impl} | "
            f"{r.median_ms:.4f} | {r.gbps:.1f} | {r.pct_of_copy:.1f} | {_fmt(r.vs_eager, '.2f')} | "
            f"{_fmt(r.vs_compile, '.2f')} | {r.timing or '-'} |")
    return "\n".join(lines)


def plot(records: list[Record], env: dict, path: Path, op: str) -> bool:
    """GB/s against row length, one panel per (direction, dtype), one line per impl."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastdl.bench: matplotlib is not installed; no plot", file=sys.stderr)
        return False
    rows = [r for r in records if r.op == op and r.error is None and not r.direction.endswith(HOST)]
    # one line per impl and row count: x is the row length
    panels = sorted({(r.direction, r.dtype) for r in rows})
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (direction, dtype) in zip(axes[0], panels):
        sel = [r for r in rows if r.direction == direction and r.dtype == dtype]
        row_counts = sorted({r.shape[0] for r in sel})
        for impl in sorted({r.impl for r in sel}):
            for n_rows in row_counts:
                pts = sorted((r.shape[-1], r.gbps) for r in sel if r.impl == impl and r.shape[0] == n_rows)
                label = impl if len(row_counts) == 1 else f"{impl} ({n_rows} rows)"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                        linestyle="-" if n_rows == row_counts[0] else ":")
        ax.axhline(env["copy_bandwidth_gbps"], color="gray", linestyle="--", label="copy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("row length (cols)")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{op} {direction} {dtype}")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{env['device']} | torch {env['torch']} | {env['commit'][:12]} | {env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(records: list[Record], env: dict, out_dir: Path, name: str, verdicts=()) -> list[Path]:
    """<name>.json (every timing, the environment and the targets' verdicts), <name>.md
    (the targets and the table) and one PNG per op under out_dir; `name` is the benchmark
    module (softmax, layer_norm...), `verdicts` what targets.check said of the run."""
    from fastdl.bench import targets  # here: targets imports this module

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps({"environment": env, "targets": [v.as_dict() for v in verdicts],
                                     "records": [dataclasses.asdict(r) for r in records]}, indent=1))
    written.append(json_path)
    md_path = out_dir / f"{name}.md"
    header = (f"# fastdl benchmarks: {name} on {env['device']}\n\n"
              + "".join(f"- {k}: {v}\n" for k, v in env.items())
              + "\nGB/s counts each input read once and each output written once; % of copy is against "
              "the device-to-device copy measured in the same run; vs eager / vs compile are "
              "speed-ups (> 1 is faster). timing: graph = the GPU's time alone (CUDA graph replay, L2 "
              "flushed before each call), events = CUDA events around each call (any wait for the host "
              "included), host = calls back to back (an eager call's cost), cpu = torch.utils.benchmark.\n\n")
    targets_section = f"## Targets\n\n{targets.markdown(verdicts)}\n\n## Timings\n\n" if verdicts else ""
    md_path.write_text(header + targets_section + markdown_table(records) + "\n")
    written.append(md_path)
    for op in sorted({r.op for r in records}):
        png = out_dir / f"{op}.png"
        if plot(records, env, png, op):
            written.append(png)
    return written
