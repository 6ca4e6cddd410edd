"""A Markdown table of an Nsight Compute log written by gpu_check.sh's step "profile".

    python3 scripts/profile_summary.py OUT/profile.log > OUT/profile.md

ncu prints its report after the process ends, kernel by kernel in launch order; the cases
(scripts/profile_kernels.py's "profile_kernels: <case>" lines) come earlier, each followed by the
"==PROF== Profiling "<kernel>" - <n>" lines of the kernels it launched. This joins the two and
keeps, for each kernel, what the runs so far were read for: its launch shape and registers,
its time, DRAM and memory throughput, L2 hit rate and achieved occupancy.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

# ncu's units, to microseconds and GB/s
_TIME_US = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}
_RATE_GBS = {"byte/s": 1e-9, "Kbyte/s": 1e-6, "Mbyte/s": 1e-3, "Gbyte/s": 1.0, "Tbyte/s": 1e3}

# a report's kernel line: "  <name> (gx, gy, gz)x(bx, by, bz), Context 1, Stream 7, Device 0, CC 9.0"
_KERNEL = re.compile(r"^  (\S.*?) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\), Context ")
_CASE = re.compile(r"^profile_kernels: (.+)$")
_PROFILED = re.compile(r'^==PROF== Profiling "(\w+)" - (\d+):')
_METRIC = re.compile(r"^    (\S.*?)\s{2,}(\S+)?\s+([\d,.]+)$")

COLUMNS = ["#", "case", "kernel", "grid x block", "registers", "time us", "DRAM %", "memory GB/s", "L2 hit %",
           "occupancy %"]


def short_name(signature: str) -> str:
    """norm_backward_tile_kernel<bf16, ..., 128, 8, 1> from ncu's demangled line: the return
    type, namespaces and argument list dropped (Triton's names are plain)."""
    name = signature.removeprefix("void ")
    depth = 0
    for i, ch in enumerate(name):  # the argument list: the first "(" outside the template arguments
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            name = name[:i]
            break
    name = re.sub(r"\b\w+::<unnamed>::|\bfastdl::|\bat::(?:native::)?", "", name)
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def parse(log: str) -> list[dict]:
    """One dict a kernel of the report, in launch order: case, kernel, grid, block and the
    metrics found (absent ones left out)."""
    case_of: dict[int, str] = {}
    case = ""
    for line in log.splitlines():
        if m := _CASE.match(line):
            case = m.group(1)
        elif m := _PROFILED.match(line):
            case_of[int(m.group(2))] = case
    rows: list[dict] = []
    row: dict | None = None
    for line in log.splitlines():
        if m := _KERNEL.match(line):
            grid = "x".join(g for g in m.group(2, 3, 4) if g != "1") or "1"
            block = "x".join(b for b in m.group(5, 6, 7) if b != "1") or "1"
            row = {"#": len(rows), "case": case_of.get(len(rows), ""), "kernel": short_name(m.group(1)),
                   "grid x block": f"{grid} x {block}"}
            rows.append(row)
            continue
        if row is None or not (m := _METRIC.match(line)):
            continue
        name, unit, value = m.group(1).strip(), m.group(2) or "", _number(m.group(3))
        if name == "Duration" and unit in _TIME_US:
            row["time us"] = value * _TIME_US[unit]
        elif name == "DRAM Throughput" and unit == "%":
            row["DRAM %"] = value
        elif name == "Memory Throughput" and unit in _RATE_GBS:
            row["memory GB/s"] = value * _RATE_GBS[unit]
        elif name == "L2 Hit Rate":
            row["L2 hit %"] = value
        elif name == "Achieved Occupancy":
            row["occupancy %"] = value
        elif name == "Registers Per Thread":
            row["registers"] = int(value)
    return rows


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return str(value).replace("|", "\\|")


def markdown(rows: list[dict], source: str) -> str:
    lines = [f"# Nsight Compute: {source}", "",
             "One profiled call a case (scripts/profile_kernels.py), its kernels in launch order; the clocks "
             "as they were (not locked), no L2 flush between kernels. time: the kernel's duration; memory "
             "GB/s: DRAM bytes a second (the inputs, made just before, may be in L2 still); DRAM %: of the "
             "device's peak.", "",
             "| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 scripts/profile_summary.py OUT/profile.log > OUT/profile.md", file=sys.stderr)
        return 2
    path = Path(argv[0])
    rows = parse(path.read_text(errors="replace"))
    if not rows:
        print(f"profile_summary: no kernel report in {path}", file=sys.stderr)
        return 1
    sys.stdout.write(markdown(rows, path.name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
