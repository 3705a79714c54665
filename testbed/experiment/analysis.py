"""Summaries over repetitions, shared by the report and the run comparison.

A case's value of a metric is the sum over its rows (one row per proxy for the proxy
resource metrics, one row otherwise); the summary over repetitions is the median with the
minimum and maximum as the spread, robust with the 2-5 repetitions a run has.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from testbed.experiment.cases import PEER_PATHS
from testbed.experiment.steadiness import HEADLINE_METRIC

BASELINE_MODE = "none"
STEADINESS_COLUMNS = ["steadiness", "steadiness_stop"]
PARAMETER_COLUMNS = ["msg_size", "parallel", "connections", "qps", "payload"]
CASE_KEY = ["mode", "placement", "workload", *PARAMETER_COLUMNS]
GROUP_KEY = [*CASE_KEY, "metric", "unit"]


def with_paths(frame: pd.DataFrame) -> pd.DataFrame:
    """Runs from before paths existed have none: mode none was direct, the rest hbone."""
    if "path" in frame.columns and frame["path"].notna().all():
        return frame
    frame = frame.copy()
    guessed = pd.Series(np.where(frame["mode"] == BASELINE_MODE, "direct", "hbone"), frame.index)
    current = frame["path"] if "path" in frame.columns else pd.Series(pd.NA, index=frame.index)
    frame["path"] = current.fillna(guessed).astype("string")
    return frame


def label_paths(frame: pd.DataFrame) -> pd.DataFrame:
    """One series per mode and path for the sections that compare modes: a mode's hbone
    path (none's direct) keeps the mode's name, its other paths become "<mode> <path>"."""
    frame = with_paths(frame).copy()
    default = (
        (frame["path"] == "hbone")
        | (frame["mode"] == BASELINE_MODE)
        | frame["path"].isin(PEER_PATHS)  # a peer has one path, named as itself
    )
    frame["mode"] = frame["mode"].where(default, frame["mode"] + " " + frame["path"])
    return frame


def measured(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[(frame["status"] == "ok") & frame["metric"].notna()]


def per_repetition(frame: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One value per case and metric: GROUP_KEY + repetition + value."""
    rows = measured(frame)
    rows = rows[rows["metric"].isin(metrics)]
    grouped = rows.groupby([*GROUP_KEY, "repetition"], dropna=False, observed=True)
    return grouped["value"].sum().reset_index()


def summarize(values: pd.DataFrame) -> pd.DataFrame:
    """Median, min, max and count over repetitions, per GROUP_KEY."""
    grouped = values.groupby(GROUP_KEY, dropna=False, observed=True)["value"]
    summary = grouped.agg(median="median", low="min", high="max", n="count").reset_index()
    return summary


def add_ratio_to_baseline(
    summary: pd.DataFrame, baseline: str = BASELINE_MODE, name: str = "ratio"
) -> pd.DataFrame:
    """<name>, <name>_low, <name>_high: each statistic over the baseline mode's (or a
    peer's) median of the same case and metric in the same run (NaN where it lacks it)."""
    key = [column for column in GROUP_KEY if column != "mode"]
    reference = summary[summary["mode"] == baseline][[*key, "median"]]
    reference = reference.rename(columns={"median": "baseline_median"})
    merged = summary.merge(reference, on=key, how="left")
    base = merged["baseline_median"].where(merged["baseline_median"] != 0)
    for column, source in ((name, "median"), (f"{name}_low", "low"), (f"{name}_high", "high")):
        merged[column] = merged[source] / base
    return merged.drop(columns=["baseline_median"])


def case_steadiness(frame: pd.DataFrame) -> pd.DataFrame:
    """CASE_KEY + steadiness + steadiness_stop, one row per case (series of repetitions);
    empty for a run from before the steadiness columns."""
    if not set(STEADINESS_COLUMNS) <= set(frame.columns):
        return pd.DataFrame(columns=[*CASE_KEY, *STEADINESS_COLUMNS])
    rows = frame[frame["steadiness"].notna()]
    return (
        rows.groupby(CASE_KEY, dropna=False, observed=True)[STEADINESS_COLUMNS]
        .first()
        .reset_index()
    )


def with_steadiness(summary: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """The summary with its cases' steadiness columns (NA where unknown)."""
    flags = case_steadiness(frame)
    summary = summary.drop(columns=[c for c in STEADINESS_COLUMNS if c in summary.columns])
    return summary.merge(flags, on=CASE_KEY, how="left")


def is_flagged(flag: object) -> bool:
    """A case whose repetitions were not steady (noisy or bimodal)."""
    return isinstance(flag, str) and flag in ("noisy", "bimodal")  # NA: not recorded


def headline_metrics() -> str:
    """ "tcp_stream: throughput, tcp_rr: rtt_p50, ..." for notes."""
    return ", ".join(f"{workload} {metric}" for workload, metric in HEADLINE_METRIC.items())


def mode_order(frame: pd.DataFrame) -> list[str]:
    """Modes in the order the run measured them, the baseline first."""
    modes = list(dict.fromkeys(frame["mode"].dropna()))
    return sorted(modes, key=lambda mode: mode != BASELINE_MODE)


def proxy_cpu_per_1000_rps(frame: pd.DataFrame) -> pd.DataFrame:
    """vCPU the proxies used per 1000 requests/s of HTTP (Istio's published figure), per
    repetition: their summed cpu_percent / 100 over achieved_qps / 1000. cpu_percent covers
    the sampled window (the load's own warm-up at the same rate included), so it is the
    right numerator where cpu_seconds / duration would overstate."""
    rows = measured(frame)
    rows = rows[rows["workload"] == "http_fixed_qps"]
    key = [*CASE_KEY, "repetition"]
    cpu = rows[rows["metric"] == "cpu_percent"].groupby(key, dropna=False)["value"].sum()
    rate = rows[rows["metric"] == "achieved_qps"].groupby(key, dropna=False)["value"].sum()
    joined = pd.concat({"cpu": cpu, "rate": rate}, axis=1, join="inner").reset_index()
    joined = joined[joined["rate"] > 0]
    joined["value"] = joined["cpu"] / 100.0 / (joined["rate"] / 1000.0)
    joined["metric"] = "proxy_vcpu_per_1000_rps"
    joined["unit"] = "vCPU"
    return joined[[*GROUP_KEY, "repetition", "value"]]
