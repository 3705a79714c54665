"""PNG figures for the report (matplotlib, Agg backend: no display needed).

Every figure has an absolute row and, when the run measured the baseline mode, a second
row with the same numbers as a ratio to that baseline. Bars and points are medians over
repetitions; the whiskers span the minimum to the maximum repetition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from testbed.experiment.analysis import BASELINE_MODE

DPI = 110


@dataclass(frozen=True)
class Scale:
    factor: float
    unit: str


@dataclass(frozen=True)
class Panel:
    title: str
    summary: pd.DataFrame  # rows of analysis.add_ratio_to_baseline, one panel's worth


def mode_colors(modes: list[str]) -> dict[str, str]:
    palette = matplotlib.colormaps["tab10"].colors  # type: ignore[attr-defined]
    return {
        mode: matplotlib.colors.to_hex(palette[i % len(palette)]) for i, mode in enumerate(modes)
    }


def _has_ratio(panels: list[Panel]) -> bool:
    """Whether some mode other than the baseline has a ratio to show."""
    return any(
        (panel.summary["ratio"].notna() & (panel.summary["mode"] != BASELINE_MODE)).any()
        for panel in panels
    )


def _spread(
    frame: pd.DataFrame, columns: tuple[str, str, str], factor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Medians and the (below, above) whisker lengths matplotlib's yerr takes."""
    middle, low, high = (frame[c].to_numpy(dtype=float) * factor for c in columns)
    return middle, np.clip(np.vstack([middle - low, high - middle]), 0, None)


def _bars(
    ax: Axes,
    panel: Panel,
    modes: list[str],
    group_of: Callable[[pd.Series], str],
    columns: tuple[str, str, str],
    factor: float,
) -> None:
    groups = list(dict.fromkeys(panel.summary.apply(group_of, axis=1)))
    plotted: list[float] = []
    width = min(0.8 / max(len(modes), 1), 0.3)
    colors = mode_colors(modes)
    for index, mode in enumerate(modes):
        rows = panel.summary[panel.summary["mode"] == mode]
        if rows.empty:
            continue
        where = [
            groups.index(group_of(row)) + (index - (len(modes) - 1) / 2) * width
            for _, row in rows.iterrows()
        ]
        heights, errors = _spread(rows, columns, factor)
        ax.bar(where, heights, width, yerr=errors, capsize=3, label=mode, color=colors[mode])
        plotted.extend(heights)
    crowded = len(groups) > 4
    ax.set_xticks(
        range(len(groups)),
        groups,
        rotation=30 if crowded else 0,
        ha="right" if crowded else "center",
    )
    ax.set_title(panel.title)
    ax.grid(axis="y", alpha=0.3)
    _fit_y(ax, plotted)


def bar_figure(
    panels: list[Panel],
    modes: list[str],
    group_of: Callable[[pd.Series], str],
    *,
    title: str,
    scale: Scale,
    path: Path,
) -> Path:
    """Grouped bars: a column of panels each, x = groups, one bar per mode."""
    rows = 2 if _has_ratio(panels) else 1
    fig, axes = plt.subplots(
        rows, len(panels), figsize=(5.5 * len(panels), 4 * rows), squeeze=False
    )
    for column, panel in enumerate(panels):
        _bars(axes[0][column], panel, modes, group_of, ("median", "low", "high"), scale.factor)
        axes[0][column].set_ylabel(scale.unit)
        if rows == 2:
            ax = axes[1][column]
            _bars(ax, panel, modes, group_of, ("ratio", "ratio_low", "ratio_high"), 1.0)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylabel(f"ratio to {BASELINE_MODE}")
    return _save(fig, axes, title, path)


def _fit_y(ax: Axes, values: list[float]) -> None:
    """A log y axis where the values span more than a decade (latency tails, a slow mode
    next to a fast one), else a linear one from 0."""
    positive = [value for value in values if value > 0]
    if positive and max(positive) > 10 * min(positive):
        _log_axis(ax)
    else:
        ax.set_ylim(bottom=0)


def _log_axis(ax: Axes) -> None:
    """Log y with plain numbers; minor ticks labelled too when the axis spans < 1 decade."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())


def line_figure(
    panels: list[Panel], modes: list[str], *, x: str, title: str, scale: Scale, path: Path
) -> Path:
    """Lines over x (e.g. connections): one line per mode, whiskers min-max."""
    rows = 2 if _has_ratio(panels) else 1
    fig, axes = plt.subplots(
        rows, len(panels), figsize=(5.5 * len(panels), 4 * rows), squeeze=False
    )
    colors = mode_colors(modes)
    for column, panel in enumerate(panels):
        row_specs = [(("median", "low", "high"), scale.factor, scale.unit)]
        if rows == 2:
            row_specs.append(
                (("ratio", "ratio_low", "ratio_high"), 1.0, f"ratio to {BASELINE_MODE}")
            )
        for row, (columns, factor, ylabel) in enumerate(row_specs):
            ax = axes[row][column]
            plotted: list[float] = []
            for mode in modes:
                data = panel.summary[panel.summary["mode"] == mode].sort_values(x)
                if data.empty:
                    continue
                middle, errors = _spread(data, columns, factor)
                ax.errorbar(
                    data[x].to_numpy(dtype=float),
                    middle,
                    yerr=errors,
                    marker="o",
                    capsize=3,
                    label=mode,
                    color=colors[mode],
                )
                plotted.extend(middle)
            ax.set_xscale("log", base=2)
            ticks = sorted(panel.summary[x].dropna().astype(float).unique())
            ax.set_xticks(ticks, [f"{tick:g}" for tick in ticks])
            ax.minorticks_off()
            _fit_y(ax, plotted)
            ax.set_xlabel(x)
            ax.set_ylabel(ylabel)
            ax.set_title(panel.title)
            ax.grid(alpha=0.3)
    return _save(fig, axes, title, path)


def _save(fig: Figure, axes: object, title: str, path: Path) -> Path:
    handles, labels = fig.axes[0].get_legend_handles_labels()
    return _finish(
        fig, handles, labels, legend_title="mode", title=title, right=0.9, top=0.95, path=path
    )


def _finish(
    fig: Figure,
    handles: list[Artist],
    labels: list[str],
    *,
    legend_title: str,
    title: str,
    right: float,
    top: float,
    path: Path,
) -> Path:
    """Legend (where there is one), title and layout, then the figure written to `path`."""
    if handles:
        fig.legend(handles, labels, loc="upper right", title=legend_title)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, right, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


LAYER_COLORS = {"direct": "#9e9e9e", "+capture": "#1f77b4", "+HBONE": "#ff7f0e",
                "+waypoint": "#2ca02c"}  # fmt: skip


def waterfall_figure(table: pd.DataFrame, *, unit: str, title: str, path: Path) -> Path:
    """Per placement a panel, per mode a stacked bar: direct, then each layer's step on top
    of the previous total (a negative step, noise or a cheaper path, hangs down from it)."""
    placements = list(dict.fromkeys(table["placement"]))
    fig, axes = plt.subplots(
        1,
        len(placements),
        figsize=(max(6.0, 1.4 * table["mode"].nunique() + 3) * len(placements), 4.5),
        squeeze=False,
    )
    for column, placement in enumerate(placements):
        ax = axes[0][column]
        rows = table[table["placement"] == placement].reset_index(drop=True)
        for x, (_, row) in enumerate(rows.iterrows()):
            bottom = 0.0
            for layer, color in LAYER_COLORS.items():
                step = float(row.get(layer, float("nan")))
                if step != step:  # NaN: that path was not run
                    continue
                ax.bar(x, step, 0.6, bottom=bottom, color=color, label=layer if x == 0 else None)
                bottom += step
        ax.set_xticks(range(len(rows)), list(rows["mode"]))
        ax.set_ylabel(unit)
        ax.set_title(placement)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = _unique_legend(fig)
    return _finish(
        fig, handles, labels, legend_title="layer", title=title, right=0.8, top=0.92, path=path
    )


def _unique_legend(fig: Figure) -> tuple[list[Artist], list[str]]:
    seen: dict[str, Artist] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)


def interval_figure(costs: pd.DataFrame, *, unit: str, title: str, path: Path) -> Path:
    """Per placement a panel, per mode a bar of `cost` with its (low, high) interval."""
    placements = list(dict.fromkeys(costs["placement"]))
    modes = list(dict.fromkeys(costs["mode"]))
    colors = mode_colors(modes)
    fig, axes = plt.subplots(1, len(placements), figsize=(5 * len(placements), 4), squeeze=False)
    for column, placement in enumerate(placements):
        ax = axes[0][column]
        rows = costs[costs["placement"] == placement]
        middle = rows["cost"].to_numpy(dtype=float)
        errors = np.clip(
            np.vstack([middle - rows["low"].to_numpy(dtype=float),
                       rows["high"].to_numpy(dtype=float) - middle]), 0, None
        )  # fmt: skip
        ax.bar(range(len(rows)), middle, 0.6, yerr=errors, capsize=4,
               color=[colors[m] for m in rows["mode"]])  # fmt: skip
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), list(rows["mode"]))
        ax.set_ylabel(unit)
        ax.set_title(placement)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
