"""The bench's figures and their statistics over repetitions (pure: no sockets, no processes)."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Figure:
    name: str
    unit: str
    proxy_only: bool = False  # a figure of the proxies: `none` has none


HTTP_CONNECTIONS = (1, 16)
FIGURES = [
    Figure("throughput", "Gbit/s"),
    Figure("rr_p50", "us"),
    Figure("rr_p99", "us"),
    Figure("connections_per_s", "conn/s"),
    *(
        Figure(f"http{conns}_{q}", "ms")
        for conns in HTTP_CONNECTIONS
        for q in ("p50", "p90", "p99")
    ),
    Figure("proxy_cpu_per_gb", "s/GB", proxy_only=True),
    *(Figure(f"proxy_vcpu_per_krps_http{c}", "vCPU", proxy_only=True) for c in HTTP_CONNECTIONS),
    Figure("proxy_rss", "MB", proxy_only=True),
]
UNITS = {figure.name: figure.unit for figure in FIGURES}


@dataclass(frozen=True)
class Sample:
    """One figure of one arm in one repetition: a tidy row."""

    rep: int
    arm: str
    figure: str
    value: float

    @property
    def unit(self) -> str:
        return UNITS[self.figure]


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    cv: float  # coefficient of variation: stdev / mean (0 for one repetition)

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        mean = statistics.fmean(values)
        cv = statistics.stdev(values) / mean if len(values) > 1 and mean else 0.0
        return cls(statistics.median(values), min(values), max(values), cv)


def expected_figures(arm: str) -> list[str]:
    return [f.name for f in FIGURES if arm != "none" or not f.proxy_only]


def missing_figures(samples: Iterable[Sample], arms: Sequence[str]) -> list[tuple[str, str]]:
    """(arm, figure) pairs with no sample at all."""
    seen = {(s.arm, s.figure) for s in samples}
    return [
        (arm, name) for arm in arms for name in expected_figures(arm) if (arm, name) not in seen
    ]


def spreads(samples: Iterable[Sample]) -> dict[tuple[str, str], Spread]:
    values: dict[tuple[str, str], list[float]] = {}
    for sample in samples:
        values.setdefault((sample.arm, sample.figure), []).append(sample.value)
    return {key: Spread.of(found) for key, found in values.items()}


def ratio(spread: dict[tuple[str, str], Spread], arm: str, base: str, figure: str) -> float | None:
    ours, theirs = spread.get((arm, figure)), spread.get((base, figure))
    if ours is None or theirs is None or not theirs.median:
        return None
    return ours.median / theirs.median


def table(samples: Sequence[Sample], arms: Sequence[str], native: str | None) -> str:
    """One line per figure and arm: median [min-max] CV, x none, x native."""
    found = spreads(samples)
    head = f"{'figure':34} {'arm':8} {'median':>10} {'min-max':>21} {'cv':>6}"
    head += f" {'x none':>8} {'x native':>9}"
    lines = [head, "-" * len(head)]
    for figure in FIGURES:
        for arm in arms:
            spread = found.get((arm, figure.name))
            if spread is None:
                continue
            to_none = ratio(found, arm, "none", figure.name)
            to_native = ratio(found, arm, native, figure.name) if native else None
            lines.append(
                f"{figure.name + ' (' + figure.unit + ')':34} {arm:8} {spread.median:10.3f} "
                f"{f'{spread.low:.3f}-{spread.high:.3f}':>21} {spread.cv:6.1%} "
                f"{_x(to_none):>8} {_x(to_native):>9}"
            )
    return "\n".join(lines)


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}x"


def write_rows(path: Path, samples: Sequence[Sample], pinning: str) -> None:
    """Tidy rows: one per repetition, arm and figure."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rep", "arm", "figure", "value", "unit", "pinning"])
        for s in samples:
            writer.writerow([s.rep, s.arm, s.figure, f"{s.value:.6g}", s.unit, pinning])


def write_summary(path: Path, samples: Sequence[Sample], native: str | None) -> None:
    found = spreads(samples)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["arm", "figure", "unit", "median", "min", "max", "cv", "ratio_none", "ratio_native"]
        )
        for (arm, name), spread in sorted(found.items()):
            to_none = ratio(found, arm, "none", name)
            to_native = ratio(found, arm, native, name) if native else None
            writer.writerow(
                [arm, name, UNITS[name], f"{spread.median:.6g}", f"{spread.low:.6g}",
                 f"{spread.high:.6g}", f"{spread.cv:.4f}",
                 "" if to_none is None else f"{to_none:.4f}",
                 "" if to_native is None else f"{to_native:.4f}"]
            )  # fmt: skip
