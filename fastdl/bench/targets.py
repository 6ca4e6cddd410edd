"""The issues' speed targets, checked against the records of one benchmark run.

Each op's benchmark module lists its targets (`TARGETS`) beside its cases. A target
names the cases it covers (op, direction, device, dtypes, shortest and longest row) and a floor on one
column of the table: % of copy bandwidth, or a speed-up against torch eager or
torch.compile. A case meets it when its best fastdl backend does; the report gives, for
each target, how many of its cases meet it and the worst one, so a run says at a glance
what is met and what is not.
"""
import dataclasses

from fastdl.bench.harness import Record

METRICS = {"pct_of_copy": "% of copy", "vs_eager": "x eager", "vs_compile": "x compile"}


@dataclasses.dataclass(frozen=True)
class Target:
    text: str  # the goal as the issue states it
    op: str
    direction: str
    device: str  # "cuda" or "cpu"
    dtypes: tuple[str, ...]  # "bfloat16", ...
    metric: str  # a key of METRICS
    minimum: float
    min_cols: int = 0  # cases whose rows are at least this long
    max_cols: int | None = None  # and at most this long (the sweep, not the longer extra cases)
    shapes: tuple[tuple[int, ...], ...] | None = None  # or exactly these shapes
    rows: int | None = None  # only cases of this many rows (the sweep, not the extra cases)


@dataclasses.dataclass
class Verdict:
    target: Target
    met: int  # cases meeting the target
    cases: int  # cases the run has for it
    worst: str  # the worst case: shape, dtype, backend and value

    @property
    def status(self) -> str:
        if self.cases == 0:
            return "NOT RUN"
        return "MET" if self.met == self.cases else "MISSED"

    def as_dict(self) -> dict:
        return dict(target=self.target.text, status=self.status, met=self.met, cases=self.cases, worst=self.worst)


def _covers(target: Target, r: Record) -> bool:
    return (r.op == target.op and r.direction == target.direction and r.dtype in target.dtypes
            and r.shape[-1] >= target.min_cols and (target.max_cols is None or r.shape[-1] <= target.max_cols)
            and (target.shapes is None or tuple(r.shape) in target.shapes)
            and (target.rows is None or r.shape[0] == target.rows))


def check(targets: list[Target], records: list[Record], device: str) -> list[Verdict]:
    """One verdict per target of this device; a case's value is its best fastdl backend's."""
    verdicts = []
    for target in (t for t in targets if t.device == device):
        best: dict[tuple, tuple[float, str]] = {}
        for r in records:
            value = getattr(r, target.metric)
            if not _covers(target, r) or not r.impl.startswith("fastdl-") or r.error or value is None or value != value:
                continue
            key = (tuple(r.shape), r.dtype)
            if key not in best or value > best[key][0]:
                best[key] = (value, r.impl)
        met = sum(1 for value, _ in best.values() if value >= target.minimum)
        worst = ""
        if best:
            (shape, dtype), (value, impl) = min(best.items(), key=lambda kv: kv[1][0])
            worst = f"{'x'.join(map(str, shape))} {dtype} {impl}: {value:.2f} {METRICS[target.metric]}"
        verdicts.append(Verdict(target, met, len(best), worst))
    return verdicts


def markdown(verdicts: list[Verdict]) -> str:
    if not verdicts:
        return ""
    lines = ["| target | status | cases met | worst case (best fastdl backend) |", "| --- | --- | ---: | --- |"]
    for v in verdicts:
        lines.append(f"| {v.target.text} | {v.status} | {v.met}/{v.cases} | {v.worst or '-'} |")
    return "\n".join(lines)
