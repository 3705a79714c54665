"""Is a case steady? The spread of its repetitions, and when `repetitions: auto` stops.

Pure: values in, verdicts out; the runner and the results store call it.

A case is judged on one figure, its workload's headline (HEADLINE_METRIC): the one a reader
compares modes by. Two flags:

- **noisy**: the coefficient of variation (sample stdev / mean) exceeds the threshold
  (`cv`, 0.10 unless the spec says otherwise: issue #11 asks for repetitions within +-10 %
  of their median, and a CV of 0.10 is about that spread for 3-10 values).
- **bimodal**: the repetitions fall into two groups. With 3-10 values no density-based test
  is honest (Hartigan's dip test needs a few dozen values before its p-values mean much;
  at n=5 it cannot reject unimodality even for two tight clusters), so the test is a gap
  statistic: sort the values, take the largest gap that leaves at least two values on each
  side, and divide it by the rest of the range (range - gap). Two tight clusters give a
  large ratio; Gaussian noise gives a small one. The threshold per n is the 99th percentile
  of that ratio for n Gaussian values (GAP_THRESHOLDS, simulated with 40,000 draws per n),
  so pure noise is called bimodal about 1 time in 100. A split also has to be material: a
  gap under MIN_RELATIVE_GAP of the median is not reported. With fewer than 4 values there
  are not two groups of two, and bimodality is not judged (it is never claimed either).
  Beyond 10 values the n=10 threshold is used, which errs towards not flagging.

A case with fewer than 2 measured repetitions is `unknown`: one value has no spread.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

# The figure each workload is judged on (a column `metric` of the tidy rows).
HEADLINE_METRIC = {
    "tcp_stream": "throughput",
    "tcp_rr": "rtt_p50",
    "tcp_crr": "connect_rate",
    "http_fixed_qps": "http_p90",  # Istio's published HTTP figure
    "http_crr": "http_p90",
}
DEFAULT_MAX_CV = 0.10
# 99th percentile of gap / (range - gap) for n Gaussian values, n = 4..10 (see above).
GAP_THRESHOLDS = {4: 6.2, 5: 3.5, 6: 2.3, 7: 1.7, 8: 1.35, 9: 1.1, 10: 1.0}
MIN_BIMODAL_VALUES = min(GAP_THRESHOLDS)
MIN_RELATIVE_GAP = 0.05

Flag = Literal["steady", "noisy", "bimodal", "unknown"]
# What ended a case's repetitions: its spread got within bounds (auto), the maximum number
# of repetitions, the time budget for extra repetitions, the fixed count of the spec, a
# failed repetition (never extended), or Ctrl-C before the case had them all.
StopReason = Literal["steady", "max", "budget", "fixed", "failed", "interrupted"]


@dataclass(frozen=True)
class Verdict:
    flag: Flag
    n: int
    cv: float | None  # None with fewer than 2 values
    gap_ratio: float | None  # None when bimodality is not judged (fewer than 4 values)

    @property
    def steady(self) -> bool:
        return self.flag == "steady"


def coefficient_of_variation(values: Sequence[float]) -> float | None:
    """Sample stdev over the mean's magnitude; None for fewer than two values, infinite
    for a zero mean with spread."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    spread = statistics.stdev(values)
    if mean == 0:
        return 0.0 if spread == 0 else float("inf")
    return spread / abs(mean)


def gap_ratio(values: Sequence[float]) -> tuple[float, float] | None:
    """(largest gap leaving >= 2 values each side, that gap over the rest of the range);
    None for fewer than 4 values. The ratio is infinite when the rest of the range is 0."""
    if len(values) < MIN_BIMODAL_VALUES:
        return None
    ordered = sorted(values)
    gaps = [ordered[i + 1] - ordered[i] for i in range(1, len(ordered) - 2)]
    gap = max(gaps)
    rest = (ordered[-1] - ordered[0]) - gap
    if gap == 0:
        return 0.0, 0.0
    return gap, (gap / rest if rest > 0 else float("inf"))


def is_bimodal(values: Sequence[float]) -> bool:
    found = gap_ratio(values)
    if found is None:
        return False
    gap, ratio = found
    threshold = GAP_THRESHOLDS.get(len(values), GAP_THRESHOLDS[max(GAP_THRESHOLDS)])
    centre = abs(statistics.median(values))
    return ratio > threshold and (centre == 0 or gap / centre >= MIN_RELATIVE_GAP)


def judge(values: Sequence[float], max_cv: float = DEFAULT_MAX_CV) -> Verdict:
    """The case's flag: bimodal before noisy (two groups explain the spread better)."""
    cv = coefficient_of_variation(values)
    found = gap_ratio(values)
    ratio = None if found is None else found[1]
    if cv is None:
        return Verdict("unknown", len(values), None, None)
    if is_bimodal(values):
        return Verdict("bimodal", len(values), cv, ratio)
    return Verdict("noisy" if cv > max_cv else "steady", len(values), cv, ratio)


@dataclass(frozen=True)
class AutoRule:
    """`repetitions: {auto: ...}`: at least `min`, at most `max` repetitions per case; extra
    repetitions (past `min`) only while the case is not steady and they fit the budget."""

    min: int
    max: int
    cv: float
    budget: float  # seconds for all extra repetitions of the run


def next_step(
    values: Sequence[float], rule: AutoRule, budget_left: float, next_cost: float
) -> StopReason | None:
    """None: run another repetition of this case; else why its repetitions end.

    `budget_left` is what remains of the budget for extra repetitions, `next_cost` the
    expected seconds of one more repetition: a repetition that would overrun is not begun.
    """
    if len(values) < rule.min:
        return None  # the first `min` repetitions always run (they are not extra)
    if judge(values, rule.cv).steady:
        return "steady"
    if len(values) >= rule.max:
        return "max"
    if next_cost > budget_left:
        return "budget"
    return None
