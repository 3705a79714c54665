"""`testbed compare RUN_A RUN_B`: what changed beyond run-to-run noise.

Criterion, per case and metric measured in both runs with at least two repetitions each:
the change counts when every repetition of one run lies beyond every repetition of the
other (the ranges do not overlap, i.e. the Mann-Whitney U statistic is 0 or maximal) and
the medians differ by at least MIN_RELATIVE_CHANGE. Non-overlap makes no assumption about
the distribution of the noise, which on 2 shared vCPUs is neither normal nor stable. With
n repetitions per run, non-overlap happens by chance with probability 2 / C(2n, n): 0.33
for n=2, 0.1 for n=3, 0.029 for n=4, 0.008 for n=5, printed as p for each change, so more
repetitions give more confidence. A case whose repetitions were not steady in either run
(noisy or bimodal: testbed.experiment.steadiness) is marked: its change is less certain
than p says, because p assumes each run's repetitions come from one distribution.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from testbed.experiment.analysis import (
    CASE_KEY,
    GROUP_KEY,
    case_steadiness,
    is_flagged,
    label_paths,
    per_repetition,
)
from testbed.experiment.report import variant_label
from testbed.results import load

MIN_RELATIVE_CHANGE = 0.02
MIN_REPETITIONS = 2
MAX_ENUMERATION = 200_000  # splits of the pooled values enumerated for the exact p-value


def mann_whitney_u(first: Sequence[float], second: Sequence[float]) -> float:
    """Pairs (x from first, y from second) with x > y, ties counting one half."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in first for y in second)


def exact_p_value(first: Sequence[float], second: Sequence[float]) -> float | None:
    """Two-sided exact Mann-Whitney p-value by enumerating every split of the pooled values;
    None when there are too many splits to enumerate."""
    pooled = [*first, *second]
    if math.comb(len(pooled), len(first)) > MAX_ENUMERATION:
        return None
    centre = len(first) * len(second) / 2
    observed = abs(mann_whitney_u(first, second) - centre)
    extreme = total = 0
    for chosen in itertools.combinations(range(len(pooled)), len(first)):
        picked = set(chosen)
        left = [pooled[i] for i in chosen]
        right = [pooled[i] for i in range(len(pooled)) if i not in picked]
        total += 1
        extreme += abs(mann_whitney_u(left, right) - centre) >= observed - 1e-9
    return extreme / total


def ranges_separate(first: Sequence[float], second: Sequence[float]) -> bool:
    return min(second) > max(first) or max(second) < min(first)


def _repetition_values(run: Path) -> pd.DataFrame:
    """GROUP_KEY + value (the repetitions' values) + steadiness (NA for older runs)."""
    frame = label_paths(load(run))
    metrics = sorted(set(frame.loc[frame["unit"] != "count", "metric"].dropna()))
    values = per_repetition(frame, metrics)
    grouped = values.groupby(GROUP_KEY, dropna=False, observed=True)["value"]
    flags = case_steadiness(frame)[[*CASE_KEY, "steadiness"]]
    return grouped.agg(list).reset_index().merge(flags, on=CASE_KEY, how="left")


def unsteady(values: pd.DataFrame) -> int:
    """How many cases of a run were not steady."""
    cases = values.drop_duplicates(CASE_KEY)
    return int(cases["steadiness"].map(is_flagged).sum())


def steadiness_mark(flag_a: object, flag_b: object) -> str:
    """ "A bimodal", "B noisy", "A noisy, B bimodal" or "" for a changed row."""
    marks = [f"{run} {flag}" for run, flag in (("A", flag_a), ("B", flag_b)) if is_flagged(flag)]
    return ", ".join(marks)


def changes(run_a: Path, run_b: Path) -> tuple[pd.DataFrame, int]:
    """The changed (case, metric) rows with median_a, median_b, change, p, unsteady; and
    how many (case, metric) pairs were compared."""
    merged = _repetition_values(run_a).merge(
        _repetition_values(run_b), on=GROUP_KEY, suffixes=("_a", "_b")
    )
    merged["unsteady"] = [
        steadiness_mark(a, b)
        for a, b in zip(merged["steadiness_a"], merged["steadiness_b"], strict=True)
    ]
    enough = merged["value_a"].map(len).ge(MIN_REPETITIONS) & merged["value_b"].map(len).ge(
        MIN_REPETITIONS
    )
    merged = merged[enough].copy()
    merged["median_a"] = merged["value_a"].map(lambda v: float(pd.Series(v).median()))
    merged["median_b"] = merged["value_b"].map(lambda v: float(pd.Series(v).median()))
    merged["change"] = (merged["median_b"] - merged["median_a"]) / merged["median_a"].abs()
    separate = [
        ranges_separate(a, b) for a, b in zip(merged["value_a"], merged["value_b"], strict=True)
    ]
    changed = merged[pd.Series(separate, index=merged.index, dtype=bool)]
    changed = changed[changed["change"].abs() >= MIN_RELATIVE_CHANGE].copy()
    changed["p"] = [
        exact_p_value(a, b) for a, b in zip(changed["value_a"], changed["value_b"], strict=True)
    ]
    return changed.sort_values("change", key=lambda c: c.abs(), ascending=False), len(merged)


def _format_rows(changed: pd.DataFrame) -> list[str]:
    header = (
        "mode",
        "placement",
        "workload",
        "case",
        "metric",
        "median A",
        "median B",
        "change",
        "p",
        "not steady",
    )
    rows = [header]
    for _, row in changed.iterrows():
        p = "" if row["p"] is None else f"{row['p']:.3g}"
        rows.append(
            (
                row["mode"],
                row["placement"],
                row["workload"],
                variant_label(row),
                row["metric"],
                f"{row['median_a']:.4g} {row['unit']}",
                f"{row['median_b']:.4g} {row['unit']}",
                f"{row['change']:+.1%}",
                p,
                row["unsteady"],
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]


def compare_runs(run_a: Path, run_b: Path) -> str:
    """A text summary of the changes from run_a to run_b beyond run-to-run noise."""
    changed, compared = changes(Path(run_a), Path(run_b))
    lines = [
        f"A: {Path(run_a).name} ({_unsteady_line(Path(run_a))})",
        f"B: {Path(run_b).name} ({_unsteady_line(Path(run_b))})",
        f"Compared {compared} (case, metric) pairs with >= {MIN_REPETITIONS} repetitions in each "
        "run. A change is listed when the repetitions' ranges do not overlap and the medians "
        f"differ by >= {MIN_RELATIVE_CHANGE:.0%}; p is the exact two-sided Mann-Whitney "
        "p-value (the chance of such a separation with no real change). 'not steady' names "
        "the run where that case's repetitions were noisy or bimodal: trust its p less.",
        "",
    ]
    if changed.empty:
        return "\n".join([*lines, "No change beyond run-to-run noise."])
    return "\n".join([*lines, *_format_rows(changed)])


def _unsteady_line(run: Path) -> str:
    values = _repetition_values(run)
    if values["steadiness"].isna().all():
        return "steadiness not recorded"
    return f"{unsteady(values)} of {len(values.drop_duplicates(CASE_KEY))} cases not steady"
