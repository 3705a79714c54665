"""The row type every measurement produces, and percentile summaries of samples."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

# The percentiles the project reports for every latency figure.
DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0, 99.9)


@dataclass(frozen=True)
class Measurement:
    """One number: `metric` (e.g. "rtt_p50") in `unit` (e.g. "us"), with descriptive labels."""

    metric: str
    value: float
    unit: str
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Each row owns its labels: callers pass shared dicts (module constants) and the
        # row is frozen, so nobody should be able to change one row through another.
        object.__setattr__(self, "labels", dict(self.labels))

    def as_row(self) -> dict[str, str | float]:
        """A flat dict for tidy tables: labels first, then metric, value and unit."""
        return {**self.labels, "metric": self.metric, "value": self.value, "unit": self.unit}


def with_labels(rows: Iterable[Measurement], labels: Mapping[str, str]) -> list[Measurement]:
    """Copies of `rows` with `labels` added (they win over labels already present)."""
    return [replace(row, labels={**row.labels, **labels}) for row in rows]


def percentile_name(percentile: float) -> str:
    """The suffix used in metric names: 50 -> "p50", 99.9 -> "p99.9", 99.99 -> "p99.99"."""
    return f"p{percentile:g}"


def nearest_rank(ordered: Sequence[float], percentile: float) -> float:
    """The nearest-rank percentile of already sorted samples: the smallest sample such that
    at least `percentile` % of all samples are <= it. Always one of the samples (no
    interpolation), as HdrHistogram and sockperf report."""
    if not ordered:
        raise ValueError("no samples")
    # Rounding first keeps 99.9% of 1000 at rank 999 despite binary floating point.
    rank = math.ceil(round(percentile * len(ordered) / 100.0, 9))
    return ordered[min(max(rank, 1), len(ordered)) - 1]


@dataclass(frozen=True)
class Summary:
    """Count, mean, extremes and nearest-rank percentiles of a list of samples."""

    count: int
    mean: float
    min: float
    max: float
    percentiles: dict[str, float]

    @classmethod
    def from_samples(
        cls, samples: Iterable[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES
    ) -> Summary:
        ordered = sorted(samples)
        if not ordered:
            raise ValueError("no samples")
        return cls(
            count=len(ordered),
            mean=math.fsum(ordered) / len(ordered),
            min=ordered[0],
            max=ordered[-1],
            percentiles={percentile_name(p): nearest_rank(ordered, p) for p in percentiles},
        )

    def to_dict(self) -> dict[str, float]:
        """Flat form, e.g. {"count": 3, "mean": 1.0, "min": ..., "max": ..., "p50": ...}."""
        fixed = {"count": self.count, "mean": self.mean, "min": self.min, "max": self.max}
        return {**fixed, **self.percentiles}

    @classmethod
    def from_dict(cls, data: Mapping[str, float]) -> Summary:
        """Inverse of `to_dict`: every key starting with "p" is a percentile."""
        return cls(
            count=int(data["count"]),
            mean=float(data["mean"]),
            min=float(data["min"]),
            max=float(data["max"]),
            percentiles={k: float(v) for k, v in data.items() if k.startswith("p")},
        )

    def measurements(
        self, prefix: str, unit: str, labels: Mapping[str, str] | None = None
    ) -> list[Measurement]:
        """Rows named `<prefix>_mean`, `_min`, `_max`, `_p50`..., in `unit`, plus
        `<prefix>_samples` (count)."""
        tags = dict(labels or {})
        values = {"mean": self.mean, "min": self.min, "max": self.max, **self.percentiles}
        rows = [Measurement(f"{prefix}_{name}", v, unit, tags) for name, v in values.items()]
        rows.append(Measurement(f"{prefix}_samples", float(self.count), "count", tags))
        return rows
