"""Which fastdl backend a committed run says `auto` should try first: the evidence behind
fastdl/backends.py:PREFERENCE.

    python -m fastdl.bench.preference benchmarks/results/h100

For every backend table entry (softmax; layer_norm with the fused add; rms_norm) and
dtype it compares the fastdl backends case by case (same op, direction, dtype and shape,
in the same run): how many cases each is the fastest in, and the geometric
mean of its time over the fastest fastdl time (1.00 = always the fastest). The sweep
(device-timed) and the small host-timed cases are reported apart: a backend can win one
and lose the other.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fastdl.bench.harness import HOST, Record

# bench op -> the PREFERENCE entry that governs it
TABLE_ENTRY = {"softmax": "softmax", "layer_norm": "layer_norm", "rms_norm": "rms_norm",
               "add_layer_norm": "layer_norm"}


def rank(records: list[Record], host: bool = False) -> dict[tuple[str, str], list[tuple[str, int, float, int]]]:
    """(table entry, dtype) -> [(backend, cases won, geomean time / fastest, cases timed)],
    best first. Only cases that timed two or more fastdl backends count."""
    by_case: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r.error is not None or not r.impl.startswith("fastdl-") or r.direction.endswith(HOST) != host:
            continue
        key = (TABLE_ENTRY.get(r.op, r.op), r.dtype, r.op, r.direction, tuple(r.shape))
        by_case.setdefault(key, {})[r.impl.removeprefix("fastdl-")] = r.median_ms
    stats: dict[tuple[str, str], dict[str, dict]] = {}
    for (entry, dtype, *_), times in by_case.items():
        if len(times) < 2:
            continue
        best = min(times.values())
        for backend, t in times.items():
            s = stats.setdefault((entry, dtype), {}).setdefault(backend, {"won": 0, "log_ratios": []})
            s["won"] += t == best
            s["log_ratios"].append(math.log(t / best))
    ranking = {}
    for group, per_backend in sorted(stats.items()):
        rows = [(backend, s["won"], math.exp(sum(s["log_ratios"]) / len(s["log_ratios"])), len(s["log_ratios"]))
                for backend, s in per_backend.items()]
        ranking[group] = sorted(rows, key=lambda row: row[2])
    return ranking


def markdown(ranking) -> str:
    lines = ["| entry | dtype | backend | fastest in | time / fastest (geomean) |", "| --- | --- | --- | ---: | ---: |"]
    for (entry, dtype), rows in ranking.items():
        for backend, won, ratio, cases in rows:
            lines.append(f"| {entry} | {dtype} | {backend} | {won}/{cases} | {ratio:.2f} |")
    return "\n".join(lines)


def load(results_dir: Path) -> list[Record]:
    records = []
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        records += [Record(**r) for r in data.get("records", [])]
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdl.bench.preference", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="a folder of <op>.json from python -m fastdl.bench")
    args = parser.parse_args(argv)
    records = load(args.results_dir)
    if not records:
        parser.error(f"no benchmark records in {args.results_dir}")
    for title, host in (("sweep (device-timed)", False), ("small inputs (host-timed)", True)):
        ranking = rank(records, host)
        print(f"## {title}\n")
        print(markdown(ranking) if ranking else "no case timed two fastdl backends")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
