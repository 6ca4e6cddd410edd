"""python -m fastdl.bench [--ops softmax] [--device cuda|cpu] [--quick] [--out DIR]

Times every case side by side (torch eager, torch.compile, each fastdl backend),
prints a table, and writes <op>.json, <op>.md and PNG plots under
benchmarks/results/<device>/ (or --out).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from fastdl.bench import OPS
from fastdl.bench.harness import ROOT, copy_bandwidth_gbps, device_slug, environment, markdown_table, run_cases, \
    write_results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastdl.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=sorted(OPS))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and shorter timing (a smoke run)")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device>)")
    parser.add_argument("--max-seconds", type=float, help="stop timing new cases after this long (the rest are "
                        "recorded as skipped); results are written either way")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    device = torch.device(args.device)
    start = time.time()
    copy_gbps = copy_bandwidth_gbps(device, args.quick)
    env = environment(device, copy_gbps)
    print(f"fastdl.bench on {env['device']} (torch {env['torch']}, commit {env['commit'][:12]}); "
          f"copy bandwidth {copy_gbps:.1f} GB/s", flush=True)
    out_dir = args.out or ROOT / "benchmarks" / "results" / device_slug(device)
    failed = total = 0
    for op in args.ops:  # one set of result files per benchmark module
        budget = None if args.max_seconds is None else max(0.0, args.max_seconds - (time.time() - start))
        records = run_cases(OPS[op].cases(device, args.quick), device, copy_gbps, args.quick, budget)
        print(markdown_table(records), flush=True)
        for path in write_results(records, env, out_dir, op):
            print(f"wrote {path}")
        total += len(records)
        failed += sum(1 for r in records if r.error and not r.error.startswith("skipped"))
    print(f"{total} timings, {failed} failed, in {time.time() - start:.0f}s")
    return 1 if total and failed == total else 0


if __name__ == "__main__":
    sys.exit(main())
