"""The soak's outputs: samples.csv and samples.parquet (tidy rows), soak.png (one panel per
metric, a line per proxy, the judged second half shaded) and summary.txt."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd

from testbed.soak.leak import THRESHOLDS, Verdict
from testbed.soak.sample import Row

if TYPE_CHECKING:
    from testbed.soak.run import Counts, SoakOptions, SoakResult

CHURN_TARGET = 10_000  # connections the issue asks a soak to churn
PANELS = {  # metric -> (title, divisor for the axis)
    "fds": ("open fds", 1.0),
    "rss_bytes": ("RSS (MiB)", float(1 << 20)),
    "cpu_percent": ("CPU (% of one CPU, per interval)", 1.0),
    "hbone_connections": ("pooled HBONE connections (established to :15008)", 1.0),
}


def write_outputs(
    folder: Path,
    options: SoakOptions,
    rows: list[Row],
    verdicts: list[Verdict],
    counts: Counts,
    say: Callable[[str], None],
) -> SoakResult:
    from testbed.soak.run import SoakResult

    frame = pd.DataFrame([dataclasses.asdict(row) for row in rows])
    frame.to_csv(folder / "samples.csv", index=False)
    frame.to_parquet(folder / "samples.parquet", index=False)
    if not frame.empty:
        plot(frame, folder / "soak.png")
    summary = summarize(options, verdicts, counts.values, counts.errors)
    (folder / "summary.txt").write_text(summary + "\n", encoding="utf-8")
    meta: dict[str, object] = {
        "options": {k: str(v) for k, v in dataclasses.asdict(options).items()},
        "counts": counts.values,
        "errors": counts.errors,
    }
    (folder / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    for line in summary.splitlines():
        say(line)
    say(f"soak: rows {folder / 'samples.csv'}, plot {folder / 'soak.png'}")
    return SoakResult(folder, verdicts, dict(counts.values), dict(counts.errors), summary)


def summarize(
    options: SoakOptions,
    verdicts: list[Verdict],
    counts: dict[str, float],
    errors: dict[str, str],
) -> str:
    churned = counts.get("connections_churned", 0.0)
    lines = [
        f"soak: mode {options.mode}, {options.duration:g} s, a sample every {options.interval:g} s",
        f"connections churned: {churned:.0f} (failed attempts, fast while the L4 DENY is on: "
        f"{counts.get('churn_errors', 0):.0f})"
        + ("" if churned >= CHURN_TARGET else f"; FEWER than the {CHURN_TARGET} asked for"),
        f"HTTP requests to reviews (through its waypoint in ambient modes): "
        f"{counts.get('http_requests', 0):.0f} "
        f"(errors, 403s of the L7 DENY included: {counts.get('http_errors', 0):.0f})",
        f"bulk transfers: {counts.get('bulk_transfers', 0):.0f} "
        f"({counts.get('bulk_bytes', 0) / 1e9:.2f} GB)",
        f"policy changes: {counts.get('policy_changes', 0):.0f} (L4 and L7 DENY, on and off)",
    ]
    for loop, error in sorted(errors.items()):
        failed = counts.get(f"{loop}_failed_steps", 0)
        lines.append(f"{loop}: {failed:.0f} steps failed, the last: {error}")
    lines += [v.describe(THRESHOLDS[v.metric]) for v in verdicts]
    leaks = [v for v in verdicts if v.leaks]
    lines.append(
        f"leaks found: {len(leaks)}"
        + "".join(f"\nLEAK: {v.proxy} {v.metric} grows without bound" for v in leaks)
    )
    return "\n".join(lines)


def plot(frame: pd.DataFrame, path: Path) -> None:
    end = float(frame["time_s"].max()) / 60
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(10, 3 * len(PANELS)), sharex=True)
    for ax, (metric, (title, divisor)) in zip(axes, PANELS.items(), strict=True):
        part = frame[frame["metric"] == metric]
        for proxy, series in part.groupby("proxy"):
            ax.plot(series["time_s"] / 60, series["value"] / divisor, label=str(proxy))
        ax.axvspan(end / 2, end, color="0.92", zorder=0)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, ncol=3)
    axes[-1].set_xlabel("minutes (shaded: the second half, where slopes are fitted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
