"""What a benchmark reports: one summary line, and rows for the table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Row:
    metric: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: reported, no target
    timing: bool = False  # a speed target (a finding), not a correctness check


@dataclass
class Result:
    name: str
    summary: str
    rows: list[Row] = field(default_factory=list)
    data: dict[str, object] = field(default_factory=dict)  # raw numbers for --json

    @property
    def ok(self) -> bool | None:
        checks = [r.ok for r in self.rows if r.ok is not None]
        return all(checks) if checks else None

    @property
    def broken(self) -> list[str]:
        """Failed correctness checks (errors, deadlocks, unrenewed accounts, ledger mismatches)."""
        return [r.metric for r in self.rows if r.ok is False and not r.timing]


def ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f} ms"


def num(value: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def verdict(ok: bool | None) -> str:
    return {True: "ok", False: "MISSED", None: ""}[ok]


def table(results: list[Result]) -> str:
    header = ("benchmark", "metric", "value", "target", "")
    lines = [(r.name, row.metric, row.value, row.target, verdict(row.ok)) for r in results for row in r.rows]
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [fmt(header), fmt(tuple("-" * w for w in widths))]
    previous = None
    for cells in lines:
        name = cells[0] if cells[0] != previous else ""
        previous = cells[0]
        out.append(fmt((name, *cells[1:])))
    return "\n".join(out)
