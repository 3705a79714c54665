"""The soak's leak detector: does a sampled series grow without bound? Pure: numbers in,
verdicts out (tests/unit/test_soak.py).

A series leaks when the least-squares line fitted over the second half of the run (the first
half is warm-up: pools fill, caches and allocator arenas grow to their working size) rises
both faster than `max_slope` per minute AND by more than `max_rise` over that half. Both
conditions, because each alone misfires: a slope alone flags a small steady drift in a
short run (2 fds over 5 minutes is 0.4/min and no leak), a rise alone flags a few noisy
samples; a leak worth failing a soak for is steady AND adds up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Threshold:
    """How much growth over the second half is still bounded, per minute and in all."""

    max_slope: float  # units per minute
    max_rise: float  # units over the second half (the fitted line's rise)
    unit: str


# Why these numbers (two nodes, ~10 minutes, 10k+ connections churned):
# - fds: a leak of one fd per connection (or per denied connection, or per config reload)
#   adds thousands; what legitimately varies is a few dozen in-flight connections and the
#   pooled HBONE connections, which plateau. 0.5/min and 10 fds over the half tolerate that.
# - rss: CPython's allocator keeps freed arenas and grows in steps of 256 KiB-1 MiB; 1 MiB/min
#   and 16 MiB over the half is well above that noise and well below a per-connection leak
#   (~1 KiB x 10k connections = 10 MiB per churn chunk).
# - cpu_percent: work per second should stay flat at a fixed offered load; it is the noisiest
#   series (2 vCPUs shared with other users; iperf3 and the churn client are closed-loop), so
#   only a rise of 3 points/min and 20 points (of one CPU) over the half fails.
# - hbone_connections: the pool holds about one connection per (source identity, destination)
#   pair in use; 0.5/min and 5 connections over the half means connections are not released.
THRESHOLDS: dict[str, Threshold] = {
    "fds": Threshold(0.5, 10.0, "fds"),
    "rss_bytes": Threshold(1 << 20, 16 << 20, "bytes"),
    "cpu_percent": Threshold(3.0, 20.0, "% of a CPU"),
    "hbone_connections": Threshold(0.5, 5.0, "connections"),
}
MIN_POINTS = 4  # fewer samples in the second half: no fit, no verdict


@dataclass(frozen=True)
class Verdict:
    """The fit of one series over the second half of the run."""

    proxy: str
    metric: str
    slope_per_min: float
    rise: float
    points: int
    leaks: bool

    def describe(self, threshold: Threshold) -> str:
        state = "LEAK" if self.leaks else "ok"
        return (
            f"{state}: {self.proxy} {self.metric} slope {self.slope_per_min:+.3g} "
            f"{threshold.unit}/min, rise {self.rise:+.3g} {threshold.unit} over the second "
            f"half ({self.points} samples; limits {threshold.max_slope:g}/min and "
            f"{threshold.max_rise:g})"
        )


def fit_slope(times: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of `values` over `times` (units per second of `times`)."""
    if len(times) != len(values):
        raise ValueError(f"{len(times)} times for {len(values)} values")
    n = len(times)
    if n < 2:
        return 0.0
    mean_t = sum(times) / n
    mean_v = sum(values) / n
    spread = sum((t - mean_t) ** 2 for t in times)
    if spread == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values, strict=True)) / spread


def second_half(times: Sequence[float], values: Sequence[float]) -> tuple[list[float], list[float]]:
    """The samples taken in the second half of the series' own time span."""
    if not times:
        return [], []
    middle = (times[0] + times[-1]) / 2
    kept = [(t, v) for t, v in zip(times, values, strict=True) if t >= middle]
    return [t for t, _ in kept], [v for _, v in kept]


def judge(
    proxy: str,
    metric: str,
    times: Sequence[float],
    values: Sequence[float],
    threshold: Threshold,
) -> Verdict:
    """`times` in seconds; leaks when both the slope and the fitted rise pass the threshold."""
    half_t, half_v = second_half(times, values)
    if len(half_t) < MIN_POINTS:
        return Verdict(proxy, metric, 0.0, 0.0, len(half_t), False)
    slope = fit_slope(half_t, half_v) * 60.0
    rise = slope * (half_t[-1] - half_t[0]) / 60.0
    leaks = slope > threshold.max_slope and rise > threshold.max_rise
    return Verdict(proxy, metric, slope, rise, len(half_t), leaks)


def judge_rows(
    rows: Iterable[tuple[str, str, float, float]],
    thresholds: dict[str, Threshold] = THRESHOLDS,
) -> list[Verdict]:
    """Rows of (proxy, metric, time_s, value), any order: one verdict per (proxy, metric)
    that has a threshold."""
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for proxy, metric, at, value in rows:
        if metric in thresholds:
            series.setdefault((proxy, metric), []).append((at, value))
    verdicts = []
    for (proxy, metric), points in sorted(series.items()):
        points.sort()
        times = [t for t, _ in points]
        values = [v for _, v in points]
        verdicts.append(judge(proxy, metric, times, values, thresholds[metric]))
    return verdicts
