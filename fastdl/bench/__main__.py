"""python -m fastdl.bench [--ops softmax] [--device cuda|cpu] [--quick] [--out DIR]
                        [--dtypes bfloat16 ...] [--max-seconds N] [--merge]

Times every case side by side (torch eager, torch.compile, each fastdl backend),
prints a table, and writes <op>.json, <op>.md and PNG plots under
benchmarks/results/<device>/ (or --out).

A sweep longer than one sitting (a GPU lent 10 minutes a call) is run in parts:
`--dtypes` picks the cases, `--merge` adds them to the <op>.json already in the output
folder (its cases not timed again are kept, the environment lists every run).
"""
import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastdl.bench import OPS, targets
from fastdl.bench.harness import ROOT, STOPPED, Progress, Record, Stopped, case_label, copy_bandwidth_gbps, \
    device_slug, dtype_name, environment, markdown_table, run_cases, skipped_record, stop_on_sigterm, stop_requested, \
    write_results


DTYPE_NAMES = ("float32", "float16", "bfloat16")


def select_cases(op, device, quick, dtypes=None):
    """The op's cases, only those of `dtypes` (names) when given."""
    cases = OPS[op].cases(device, quick)
    return [c for c in cases if dtypes is None or dtype_name(c.dtype) in dtypes]


def _case_key(r: Record):
    return r.op, r.direction, r.dtype, tuple(r.shape)


def _skipped(r: Record) -> bool:
    return (r.error or "").startswith("skipped")


def merge_previous(path: Path, records: list, env: dict, order: list) -> tuple[list, dict]:
    """This run's records plus the previous run's (in `path`) for every case this run did
    not time, in the order of the case list `order` (case keys); env gains `runs`, the
    date, commit and copy bandwidth of every run merged."""
    if not path.exists():
        return records, env
    previous = json.loads(path.read_text())
    timed_now = {_case_key(r) for r in records if not _skipped(r)}
    kept = [r for r in (Record(**d) for d in previous.get("records", [])) if _case_key(r) not in timed_now]
    timed_before = {_case_key(r) for r in kept if not _skipped(r)}
    new = [r for r in records if not (_skipped(r) and _case_key(r) in timed_before)]
    position = {key: i for i, key in enumerate(order)}
    merged = sorted(kept + new, key=lambda r: position.get(_case_key(r), len(position)))
    run_fields = ("date", "commit", "copy_bandwidth_gbps")
    old_env = previous.get("environment", {})
    runs = old_env.get("runs") or [{k: old_env.get(k) for k in run_fields}]
    return merged, dict(env, runs=runs + [{k: env.get(k) for k in run_fields}])


def checkpoint(out_dir: Path, op: str, env: dict):
    """(path, write): write(records) puts the records timed so far in <op>.json.partial, so that
    a process that dies mid-run (a segfault, where SIGTERM would have let it write its results)
    leaves them; a run that ends writes <op>.json and removes the partial file. The name keeps
    it out of `*.json` (preference, --merge)."""
    path = out_dir / f"{op}.json.partial"

    def write(records):
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"environment": env, "records": [dataclasses.asdict(r) for r in records]}))

    return path, write


def run_isolated(op, device, copy_gbps, quick, max_seconds, dtypes=None):
    """run_cases, each case in a fresh `python -m fastdl.bench --only-case i` process."""
    cases = select_cases(op, device, quick, dtypes)
    progress = Progress(len(cases), f"fastdl.bench {op}")
    records, start = [], time.time()
    for i, case in enumerate(cases):
        if stop_requested():
            records.append(skipped_record(case, STOPPED))
        elif max_seconds is not None and time.time() - start > max_seconds:
            records.append(skipped_record(case, "over the time budget"))
        else:
            cmd = [sys.executable, "-m", "fastdl.bench", "--ops", op, "--device", device.type, "--only-case", str(i),
                   "--copy-gbps", str(copy_gbps)] + (["--quick"] if quick else []) + \
                (["--dtypes", *dtypes] if dtypes else [])
            try:
                child = subprocess.run(cmd, capture_output=True, text=True)
                records.extend(Record(**r) for r in json.loads(child.stdout.strip().splitlines()[-1]))
            except (ValueError, IndexError):
                records.append(Record(case.op, case.direction, dtype_name(case.dtype), list(case.shape), "-",
                                      float("nan"), float("nan"), float("nan"), 0.0, 0.0,
                                      error=f"case process failed: {child.stderr.strip()[-300:]}"))
            except Stopped:  # subprocess.run has ended the child
                records.append(skipped_record(case, STOPPED))
        progress.update(case_label(case))
    progress.close()
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastdl.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=sorted(OPS))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and shorter timing (a smoke run)")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device>)")
    parser.add_argument("--max-seconds", type=float, help="stop timing new cases after this long (the rest are "
                        "recorded as skipped); results are written either way")
    parser.add_argument("--no-isolate", action="store_true",
                        help="on the CPU, time every case in this process (default: a fresh process per case, "
                        "since large CPU allocations cost what earlier cases left the allocator in)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPE_NAMES, help="only the cases of these dtypes")
    parser.add_argument("--merge", action="store_true",
                        help="add to the <op>.json already in the output folder (cases not timed here are kept)")
    # internal: run one case in a child process and print its records as JSON
    parser.add_argument("--only-case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--copy-gbps", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    device = torch.device(args.device)
    if args.only_case is not None:  # the child of an isolated run
        case = select_cases(args.ops[0], device, args.quick, args.dtypes)[args.only_case]
        records = run_cases([case], device, args.copy_gbps, args.quick, show_progress=False)
        print(json.dumps([dataclasses.asdict(r) for r in records]))
        return 0
    stop_on_sigterm()  # a timeout's SIGTERM still writes what was timed
    start = time.time()
    copy_gbps = copy_bandwidth_gbps(device, args.quick)
    env = environment(device, copy_gbps)
    print(f"fastdl.bench on {env['device']} (torch {env['torch']}, commit {env['commit'][:12]}); "
          f"copy bandwidth {copy_gbps:.1f} GB/s", flush=True)
    out_dir = args.out or ROOT / "benchmarks" / "results" / device_slug(device)
    failed = total = 0
    for op in args.ops:  # one set of result files per benchmark module
        budget = None if args.max_seconds is None else max(0.0, args.max_seconds - (time.time() - start))
        partial, write_partial = checkpoint(out_dir, op, env)
        if device.type == "cpu" and not args.no_isolate:  # each case in its own process already
            records = run_isolated(op, device, copy_gbps, args.quick, budget, args.dtypes)
        else:
            records = run_cases(select_cases(op, device, args.quick, args.dtypes), device, copy_gbps, args.quick,
                                budget, on_case=write_partial)
        print(markdown_table(records), flush=True)
        total += len(records)
        failed += sum(1 for r in records if r.error and not _skipped(r))
        op_env = env
        if args.merge:
            order = [(c.op, c.direction, dtype_name(c.dtype), tuple(c.shape))
                     for c in OPS[op].cases(device, args.quick)]
            records, op_env = merge_previous(out_dir / f"{op}.json", records, env, order)
        verdicts = targets.check(getattr(OPS[op], "TARGETS", []), records, device.type)
        if verdicts:
            merged = " (merged runs)" if args.merge else ""
            print(f"\n{op} targets{merged}:\n{targets.markdown(verdicts)}\n", flush=True)
        for path in write_results(records, op_env, out_dir, op, verdicts):
            print(f"wrote {path}")
        partial.unlink(missing_ok=True)
    stopped = " (stopped by SIGTERM: the cases after it are recorded as skipped)" if stop_requested() else ""
    print(f"{total} timings, {failed} failed, in {time.time() - start:.0f}s{stopped}")
    return 1 if total and failed == total else 0


if __name__ == "__main__":
    sys.exit(main())
