"""Where the time goes: a mode's cost split by layer, from the paths it ran.

Every meshed mode ran `capture`, `hbone` and maybe `waypoint` on one cluster; mode `none`
ran `direct`. The steps between consecutive paths are the cost of one layer each:

    direct -> +capture (redirection and the client's proxy, no TLS)
           -> +HBONE (the server's proxy, mTLS, HTTP/2 CONNECT)
           -> +waypoint (an L7 proxy in the middle)

The figures compared: request/response p50 (tcp_rr, us), CPU per GB moved (tcp_stream) and
CPU per 1000 requests (tcp_crr: one new connection each), where CPU is the whole machine's
busy time (user + system + softirq..., so that kernel work the redirection adds counts) and,
separately, the proxies' own CPU split into user and system.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from testbed.experiment.analysis import BASELINE_MODE, CASE_KEY, measured, with_paths

PATH_ORDER = ("direct", "capture", "hbone", "waypoint")
STEP_NAMES = {"direct": "direct", "capture": "+capture", "hbone": "+HBONE", "waypoint": "+waypoint"}
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 12  # fixed: a report made twice from the same run is the same report


@dataclass(frozen=True)
class Figure:
    """One breakdown figure: its name, unit, and how to get one value per repetition."""

    name: str
    unit: str
    workload: str
    title: str


FIGURES = (
    Figure("rr_p50", "us", "tcp_rr", "request/response p50 (tcp_rr)"),
    Figure("cpu_per_gb", "CPU-s/GB", "tcp_stream", "machine CPU per GB (tcp_stream)"),
    Figure("cpu_per_1000_conn", "CPU-s/1000", "tcp_crr", "machine CPU per 1000 new connections"),
    Figure("proxy_user_per_gb", "CPU-s/GB", "tcp_stream", "proxy user CPU per GB"),
    Figure("proxy_system_per_gb", "CPU-s/GB", "tcp_stream", "proxy system CPU per GB"),
)
FIGURE_BY_NAME = {figure.name: figure for figure in FIGURES}
REP_KEY = [*CASE_KEY, "path", "repetition"]


def _metric(rows: pd.DataFrame, metric: str) -> pd.Series:
    """Summed per repetition of a case (one row per proxy for the proxies' metrics)."""
    part = rows[rows["metric"] == metric]
    return part.groupby(REP_KEY, dropna=False)["value"].sum()


def _smallest_case(rows: pd.DataFrame) -> pd.DataFrame:
    """The cases of the smallest swept size or stream count: the figure is about the
    layers, the sweeps have their own sections."""
    for column in ("msg_size", "parallel"):
        if rows[column].notna().any():
            rows = rows[rows[column] == rows[column].min()]
    return rows


def figure_values(frame: pd.DataFrame, figure: Figure) -> pd.DataFrame:
    """One value per repetition: REP_KEY + value, for the cases of figure.workload."""
    rows = measured(with_paths(frame))
    rows = _smallest_case(rows[rows["workload"] == figure.workload])
    if rows.empty:
        return pd.DataFrame(columns=[*REP_KEY, "value"])
    if figure.name == "rr_p50":
        value = _metric(rows, "rtt_p50")
    elif figure.workload == "tcp_stream":
        gb_per_s = _metric(rows, "throughput") / 8e9
        source = {
            "cpu_per_gb": "machine_busy_percent",
            "proxy_user_per_gb": "cpu_user_percent",
            "proxy_system_per_gb": "cpu_system_percent",
        }[figure.name]
        cpu = _metric(rows, source)
        if source != "machine_busy_percent":  # mode none runs no proxy: zero, not unknown
            cpu = cpu.reindex(gb_per_s.index, fill_value=0.0)
        value = (cpu / 100.0) / gb_per_s.where(gb_per_s > 0)
    else:
        per_thousand = _metric(rows, "connect_rate") / 1000.0
        value = (_metric(rows, "machine_busy_percent") / 100.0) / per_thousand.where(
            per_thousand > 0
        )
    value = value.dropna()
    return value.rename("value").reset_index()


def path_medians(values: pd.DataFrame) -> pd.DataFrame:
    """Median over repetitions per case and path (CASE_KEY + path + median + n)."""
    grouped = values.groupby([*CASE_KEY, "path"], dropna=False)["value"]
    return grouped.agg(median="median", n="count").reset_index()


def breakdown_table(frame: pd.DataFrame, figure: Figure) -> pd.DataFrame:
    """Per meshed mode and placement: the direct value (mode none's) and each layer's step
    (columns direct, +capture, +HBONE, +waypoint; NaN where a path was not run), the total,
    and the layer with the largest step."""
    medians = path_medians(figure_values(frame, figure))
    if medians.empty:
        return pd.DataFrame()
    key = [c for c in CASE_KEY if c != "mode"]
    direct = medians[(medians["mode"] == BASELINE_MODE) & (medians["path"] == "direct")]
    direct = direct[[*key, "median"]].rename(columns={"median": "direct_value"})
    meshed = medians[(medians["mode"] != BASELINE_MODE) & medians["path"].isin(PATH_ORDER)]
    wide = meshed.pivot_table(
        index=["mode", *key], columns="path", values="median", dropna=False, observed=True
    ).reset_index()
    wide = wide.merge(direct, on=key, how="left")
    rows = []
    for _, row in wide.iterrows():
        values = {"direct": _number(row.get("direct_value"))}
        values |= {path: _number(row.get(path)) for path in PATH_ORDER[1:]}
        steps = _steps(values)
        known = {name: step for name, step in steps.items() if name != "direct" and step == step}
        dominant = max(known, key=lambda name: known[name]) if known else ""
        total = next((v for v in reversed(values.values()) if v is not None), float("nan"))
        rows.append(
            {
                "mode": row["mode"],
                "placement": row["placement"],
                **steps,
                "total": total,
                "dominant": dominant,
            }
        )
    return pd.DataFrame(rows)


def _number(value: object) -> float | None:
    """A float, or None for a missing value (NaN, NA, None)."""
    if value is None or not isinstance(value, int | float | np.floating | np.integer):
        return None
    number = float(value)
    return None if number != number else number


def _steps(values: dict[str, float | None]) -> dict[str, float]:
    """Each path's value minus the previous measured path's (direct itself comes first);
    NaN where a path or everything before it is missing."""
    steps: dict[str, float] = {}
    previous: float | None = None
    for path in PATH_ORDER:
        number = values.get(path)
        if path == "direct":
            steps[STEP_NAMES[path]] = float("nan") if number is None else number
        elif number is None or previous is None:
            steps[STEP_NAMES[path]] = float("nan")
        else:
            steps[STEP_NAMES[path]] = number - previous
        if number is not None:
            previous = number
    return steps


def dominant_sentence(mode: str, table: pd.DataFrame, figure: Figure) -> str:
    """ "inpod: +HBONE dominates request/response p50 (+150 us of 210 us, cross-node)."""
    rows = table[(table["mode"] == mode) & (table["dominant"] != "")]
    if rows.empty:
        return f"{mode}: no {figure.title} to break down."
    parts = []
    for _, row in rows.iterrows():
        step = float(row[row["dominant"]])
        parts.append(
            f"{row['dominant']} dominates {figure.title} on {row['placement']} "
            f"({step:+.3g} {figure.unit} of {float(row['total']):.3g})"
        )
    return f"{mode}: " + "; ".join(parts) + "."


def bootstrap_difference(
    treated: np.ndarray, baseline: np.ndarray, samples: int = BOOTSTRAP_SAMPLES
) -> tuple[float, float, float]:
    """Median(treated) - median(baseline) and its 95 % percentile-bootstrap interval,
    resampling each side's repetitions with replacement (seeded)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    point = float(np.median(treated) - np.median(baseline))
    a = rng.choice(treated, size=(samples, len(treated)), replace=True)
    b = rng.choice(baseline, size=(samples, len(baseline)), replace=True)
    spread = np.median(a, axis=1) - np.median(b, axis=1)
    low, high = np.percentile(spread, [2.5, 97.5])
    return point, float(low), float(high)


def capture_costs(frame: pd.DataFrame, figure: Figure) -> pd.DataFrame:
    """Per meshed mode and placement: capture minus direct, with a bootstrap 95 % interval
    over repetitions (mode, placement, cost, low, high, n)."""
    values = figure_values(frame, figure)
    if values.empty:
        return pd.DataFrame()
    rows = []
    direct = values[(values["mode"] == BASELINE_MODE) & (values["path"] == "direct")]
    capture = values[(values["mode"] != BASELINE_MODE) & (values["path"] == "capture")]
    for (mode, placement), part in capture.groupby(["mode", "placement"], sort=False):
        base = direct[direct["placement"] == placement]["value"].to_numpy(dtype=float)
        treated = part["value"].to_numpy(dtype=float)
        if len(base) == 0 or len(treated) == 0:
            continue
        cost, low, high = bootstrap_difference(treated, base)
        rows.append(
            {
                "mode": mode,
                "placement": placement,
                "cost": cost,
                "low": low,
                "high": high,
                "n": len(treated),
            }
        )
    return pd.DataFrame(rows)
