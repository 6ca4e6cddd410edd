"""python -m fastdl.bench [--ops softmax] [--device cuda|cpu] [--quick] [--out DIR]

Times every case side by side (torch eager, torch.compile, each fastdl backend),
prints a table, and writes <op>.json, <op>.md and PNG plots under
benchmarks/results/<device>/ (or --out).
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
from fastdl.bench.harness import ROOT, Progress, Record, copy_bandwidth_gbps, device_slug, environment, \
    markdown_table, run_cases, write_results


def run_isolated(op, device, copy_gbps, quick, max_seconds):
    """run_cases, each case in a fresh `python -m fastdl.bench --only-case i` process."""
    cases = OPS[op].cases(device, quick)
    progress = Progress(len(cases), f"fastdl.bench {op}")
    records, start = [], time.time()
    for i, case in enumerate(cases):
        dtype = str(case.dtype).replace("torch.", "")
        if max_seconds is not None and time.time() - start > max_seconds:
            records.append(Record(case.op, case.direction, dtype, list(case.shape), "-", float("nan"), float("nan"),
                                  float("nan"), 0.0, 0.0, error="skipped: over the time budget"))
        else:
            cmd = [sys.executable, "-m", "fastdl.bench", "--ops", op, "--device", device.type, "--only-case", str(i),
                   "--copy-gbps", str(copy_gbps)] + (["--quick"] if quick else [])
            child = subprocess.run(cmd, capture_output=True, text=True)
            try:
                records.extend(Record(**r) for r in json.loads(child.stdout.strip().splitlines()[-1]))
            except (ValueError, IndexError):
                records.append(Record(case.op, case.direction, dtype, list(case.shape), "-", float("nan"),
                                      float("nan"), float("nan"), 0.0, 0.0,
                                      error=f"case process failed: {child.stderr.strip()[-300:]}"))
        progress.update(f"{case.op} {case.direction} {dtype} {'x'.join(map(str, case.shape))}")
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
    # internal: run one case in a child process and print its records as JSON
    parser.add_argument("--only-case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--copy-gbps", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    device = torch.device(args.device)
    if args.only_case is not None:  # the child of an isolated run
        case = OPS[args.ops[0]].cases(device, args.quick)[args.only_case]
        records = run_cases([case], device, args.copy_gbps, args.quick, show_progress=False)
        print(json.dumps([dataclasses.asdict(r) for r in records]))
        return 0
    start = time.time()
    copy_gbps = copy_bandwidth_gbps(device, args.quick)
    env = environment(device, copy_gbps)
    print(f"fastdl.bench on {env['device']} (torch {env['torch']}, commit {env['commit'][:12]}); "
          f"copy bandwidth {copy_gbps:.1f} GB/s", flush=True)
    out_dir = args.out or ROOT / "benchmarks" / "results" / device_slug(device)
    failed = total = 0
    for op in args.ops:  # one set of result files per benchmark module
        budget = None if args.max_seconds is None else max(0.0, args.max_seconds - (time.time() - start))
        if device.type == "cpu" and not args.no_isolate:
            records = run_isolated(op, device, copy_gbps, args.quick, budget)
        else:
            records = run_cases(OPS[op].cases(device, args.quick), device, copy_gbps, args.quick, budget)
        print(markdown_table(records), flush=True)
        verdicts = targets.check(getattr(OPS[op], "TARGETS", []), records, device.type)
        if verdicts:
            print(f"\n{op} targets:\n{targets.markdown(verdicts)}\n", flush=True)
        for path in write_results(records, env, out_dir, op, verdicts):
            print(f"wrote {path}")
        total += len(records)
        failed += sum(1 for r in records if r.error and not r.error.startswith("skipped"))
    print(f"{total} timings, {failed} failed, in {time.time() - start:.0f}s")
    return 1 if total and failed == total else 0


if __name__ == "__main__":
    sys.exit(main())
