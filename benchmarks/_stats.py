"""Figures: latency summaries, ratios against a target, and one printable section per result."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(sorted_ms: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of already sorted samples."""
    if not sorted_ms:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_ms)))
    return sorted_ms[min(rank, len(sorted_ms)) - 1]


@dataclass(frozen=True, slots=True)
class Latency:
    """A latency distribution, in milliseconds."""

    n: int
    p50: float
    p90: float
    p99: float
    mean: float
    max: float

    @classmethod
    def of_ns(cls, samples_ns: Sequence[int]) -> Latency:
        ms = sorted(s / 1e6 for s in samples_ns)
        return cls(
            n=len(ms),
            p50=percentile(ms, 0.50),
            p90=percentile(ms, 0.90),
            p99=percentile(ms, 0.99),
            mean=statistics.fmean(ms) if ms else math.nan,
            max=ms[-1] if ms else math.nan,
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "n": self.n,
            "p50_ms": self.p50,
            "p90_ms": self.p90,
            "p99_ms": self.p99,
            "mean_ms": self.mean,
            "max_ms": self.max,
        }


@dataclass(frozen=True, slots=True)
class Ratio:
    """One measured ratio, and the issue's target for it when there is one.

    ``limit`` is the bound the value must respect: at most ``limit`` when
    ``higher_is_better`` is false (a latency ratio), at least ``limit`` otherwise.
    """

    benchmark: str
    backend: str
    what: str
    value: float
    limit: float | None = None
    higher_is_better: bool = False
    unit: str = "x"

    @property
    def verdict(self) -> str:
        if self.limit is None or math.isnan(self.value):
            return "info"
        ok = self.value >= self.limit if self.higher_is_better else self.value <= self.limit
        return "pass" if ok else "MISS"

    @property
    def target(self) -> str:
        if self.limit is None:
            return "-"
        return f"{'>=' if self.higher_is_better else '<='} {self.limit:g}{self.unit}"

    def line(self) -> str:
        verdict = "" if self.limit is None else f"  target {self.target}: {self.verdict}"
        return (
            f"ratio {self.benchmark} [{self.backend}] {self.what} = "
            f"{_number(self.value)}{self.unit}{verdict}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "backend": self.backend,
            "what": self.what,
            "value": self.value,
            "unit": self.unit,
            "target": self.target,
            "verdict": self.verdict,
        }


def _number(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


@dataclass
class Section:
    """One benchmark on one backend: a table of figures, its ratios, and raw data for JSON."""

    benchmark: str
    backend: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    ratios: list[Ratio]
    figures: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        widths = [
            max(len(str(row[i])) for row in [self.columns, *self.rows])
            for i in range(len(self.columns))
        ]
        lines = [f"== {self.benchmark} [{self.backend}]: {self.title}"]
        for i, row in enumerate([self.columns, *self.rows]):
            cells = [
                cell.ljust(width) if j == 0 else cell.rjust(width)
                for j, (cell, width) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  " + "  ".join(cells).rstrip())
            if i == 0:
                lines.append("  " + "  ".join("-" * width for width in widths))
        lines.extend(r.line() for r in self.ratios)
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "backend": self.backend,
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "ratios": [r.as_dict() for r in self.ratios],
            "figures": self.figures,
        }


def ms(value: float) -> str:
    """A duration in milliseconds for a table cell."""
    if math.isnan(value):
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def times(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"
