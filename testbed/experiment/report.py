"""`testbed report RUN`: report.md with PNG figures, from a run's results and metadata."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from testbed.experiment import breakdown
from testbed.experiment.analysis import (
    BASELINE_MODE,
    CASE_KEY,
    PARAMETER_COLUMNS,
    add_ratio_to_baseline,
    headline_metrics,
    is_flagged,
    label_paths,
    mode_order,
    per_repetition,
    proxy_cpu_per_1000_rps,
    summarize,
    with_steadiness,
)
from testbed.experiment.peers import NATIVE
from testbed.experiment.plots import (
    Panel,
    Scale,
    bar_figure,
    interval_figure,
    line_figure,
    waterfall_figure,
)
from testbed.experiment.published import published_section
from testbed.experiment.store import RunStore
from testbed.experiment.walks import walks_section
from testbed.results import load

REPORT_NAME = "report.md"
PLACEMENT_ORDER = {"same-node": 0, "cross-node": 1}
FIGURES_DIR = "figures"
PERCENTILES = ("p50", "p90", "p99", "p99.9")
# tcp_rr: one request/response on a kept connection; tcp_crr: connect, request, response, close.
LATENCY_PREFIX = {"tcp_rr": "rtt", "tcp_crr": "transaction"}
LATENCY_TITLE = {
    "tcp_rr": "Request/response round trip on one connection (tcp_rr)",
    "tcp_crr": "Connect, request/response and close (tcp_crr)",
}
HTTP_PERCENTILE = re.compile(r"_p(50|90|99|99\.9|999)$")
HTTP_PLOTTED = ("p90", "p99")  # as on Istio's performance page
GBITS = Scale(1e-9, "Gbit/s")
MICROSECONDS = Scale(1.0, "us")
VCPU = Scale(0.01, "vCPU, all proxies")
MEGABYTES = Scale(1e-6, "MB RSS, all proxies")


@dataclass(frozen=True)
class FigureTexts:
    """A figure's title, file name and alt text, and the heading of its section if it has
    one; for a kind of figure that stands for several, templates of `name` and `title`."""

    title: str
    file: str
    alt: str
    heading: str = ""

    def of(self, **names: str) -> FigureTexts:
        return FigureTexts(**{key: text.format(**names) for key, text in asdict(self).items()})


THROUGHPUT_BARS = FigureTexts(
    "TCP throughput (iperf3, receiver side)",
    "throughput.png",
    "throughput per mode",
    heading="## Throughput (tcp_stream)",
)
LATENCY_BARS = FigureTexts(
    "{title}: latency percentiles",
    "latency_{name}.png",
    "{name}",
    heading="## Latency percentiles ({name})",
)
PROXY_BARS = FigureTexts(
    "Proxy {name} during the measured part of each case",
    "proxy_{name}.png",
    "proxy {name} per mode",
    heading="### Proxy {name}",
)
WATERFALL = FigureTexts(
    "Where the time goes: {title}", "breakdown_{name}.png", "breakdown of {title}"
)
CAPTURE_ALONE_INTERVALS = FigureTexts(
    "Capture alone (capture - direct): {title}, 95 % bootstrap interval",
    "capture_alone_{name}.png",
    "modes compared on capture alone, {title}",
)


class UnitFigure(Protocol):
    """A figure of a table of values in one unit (plots.waterfall_figure, interval_figure)."""

    def __call__(self, data: pd.DataFrame, /, *, unit: str, title: str, path: Path) -> Path: ...


def variant_label(row: pd.Series) -> str:
    """The swept parameters of a summary row, e.g. "connections=16 qps=1000"."""
    parts = [f"{c}={row[c]}" for c in PARAMETER_COLUMNS if c != "payload" and pd.notna(row[c])]
    return " ".join(parts) or "-"


def short_case_label(row: pd.Series) -> str:
    """A compact x tick for a case: "stream x1", "rr 64B", "http c16 1000/s"."""
    workload = str(row["workload"])
    if workload == "tcp_stream":
        return f"stream x{row['parallel']}"
    if workload in ("tcp_rr", "tcp_crr"):
        return f"{workload.removeprefix('tcp_')} {row['msg_size']}B"
    return f"http c{row['connections']} {row['qps']}/s"


def _number(value: Any, factor: float = 1.0) -> str:
    return "" if pd.isna(value) else f"{float(value) * factor:.4g}"


# The mark of a case whose repetitions were not steady, in the tables' n column.
UNSTEADY_MARK = "⚠"
STOP_MEANING = {
    "steady": "its spread came within bounds",
    "max": "it reached the maximum repetitions",
    "budget": "the budget for extra repetitions ran out",
    "fixed": "the spec's fixed count",
    "failed": "a repetition failed",
    "interrupted": "the run was interrupted",
}


def markdown_table(summary: pd.DataFrame, scale: Scale) -> str:
    """The summary as a table (a ratio to the native peer where the run has one), a mark
    on each case that was not steady, and a note naming them under the table."""
    native = "ratio_native" in summary.columns and bool(summary["ratio_native"].notna().any())
    header = f"| mode | placement | workload | case | metric | median ({scale.unit}) "
    header += f"| min-max | n | ratio to {BASELINE_MODE} |"
    header += f" ratio to {NATIVE} |" if native else ""
    header += "\n" + "|---" * (10 if native else 9) + "|\n"
    lines = []
    for _, row in summary.iterrows():
        spread = f"{_number(row['low'], scale.factor)}-{_number(row['high'], scale.factor)}"
        flag = row.get("steadiness")
        cells = [
            row["mode"],
            row["placement"],
            row["workload"],
            variant_label(row),
            row["metric"],
            _number(row["median"], scale.factor),
            spread,
            f"{row['n']} {UNSTEADY_MARK} {flag}" if is_flagged(flag) else str(row["n"]),
            _number(row["ratio"]),
            *([_number(row["ratio_native"])] if native else []),
        ]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return header + "\n".join(lines) + "\n" + steadiness_note(summary)


def steadiness_note(summary: pd.DataFrame) -> str:
    """Under a table: which of its cases were not steady and what ended their repetitions."""
    if "steadiness" not in summary.columns:
        return ""
    flagged = summary[summary["steadiness"].map(is_flagged)].drop_duplicates(CASE_KEY)
    if flagged.empty:
        return ""
    cases = "; ".join(
        f"{row['mode']} {row['placement']} {row['workload']} {variant_label(row)}: "
        f"{row['steadiness']}, ended as {STOP_MEANING.get(str(row['steadiness_stop']), '?')}"
        for _, row in flagged.iterrows()
    )
    return (
        f"\n{UNSTEADY_MARK} not steady over its repetitions (judged on {headline_metrics()}; "
        "noisy: coefficient of variation above the run's threshold; bimodal: the "
        f"repetitions form two groups): {cases}.\n"
    )


def _summary(frame: pd.DataFrame, metrics: list[str], modes: list[str]) -> pd.DataFrame:
    summary = add_ratio_to_baseline(summarize(per_repetition(frame, metrics)))
    if NATIVE in modes:
        summary = add_ratio_to_baseline(summary, NATIVE, name="ratio_native")
    return _order(with_steadiness(summary, frame), modes)


def _order(summary: pd.DataFrame, modes: list[str]) -> pd.DataFrame:
    """Summary rows in reading order: modes as measured, same-node first, then the case."""
    order = summary.assign(
        mode_rank=summary["mode"].map(modes.index),
        placement_rank=summary["placement"].map(lambda p: PLACEMENT_ORDER.get(p, 2)),
    )
    keys = ["mode_rank", "placement_rank", "workload", *PARAMETER_COLUMNS, "metric"]
    return order.sort_values(keys).drop(columns=["mode_rank", "placement_rank"])


def _panels(summary: pd.DataFrame, by: str) -> list[Panel]:
    """One panel per value of `by`, same-node before cross-node."""
    keys = sorted(summary[by].unique(), key=lambda key: (PLACEMENT_ORDER.get(key, 2), key))
    return [Panel(str(key), summary[summary[by] == key]) for key in keys]


def _image(run_dir: Path, path: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(run_dir)})\n"


def _unit_figure(
    draw: UnitFigure, data: pd.DataFrame, unit: str, texts: FigureTexts, run_dir: Path
) -> str:
    """Draw a figure of values in `unit` into the run's figures folder; its image line."""
    path = draw(data, unit=unit, title=texts.title, path=run_dir / FIGURES_DIR / texts.file)
    return _image(run_dir, path, texts.alt)


def _throughput(frame: pd.DataFrame, modes: list[str], run_dir: Path) -> str:
    summary = _summary(frame[frame["workload"] == "tcp_stream"], ["throughput"], modes)
    if summary.empty:
        return ""
    return _bar_section(summary, modes, variant_label, THROUGHPUT_BARS, GBITS, run_dir)


def _bar_section(
    summary: pd.DataFrame,
    modes: list[str],
    group_of: Callable[[pd.Series], str],
    texts: FigureTexts,
    scale: Scale,
    run_dir: Path,
) -> str:
    """A heading, a bar figure (a panel per placement) and the table it shows."""
    path = run_dir / FIGURES_DIR / texts.file
    panels = _panels(summary, "placement")
    bar_figure(panels, modes, group_of, title=texts.title, scale=scale, path=path)
    image = _image(run_dir, path, texts.alt)
    return f"{texts.heading}\n\n" + image + "\n" + markdown_table(summary, scale)


def _latency(frame: pd.DataFrame, modes: list[str], run_dir: Path) -> str:
    text = ""
    for workload, prefix in LATENCY_PREFIX.items():
        metrics = [f"{prefix}_{percentile}" for percentile in PERCENTILES]
        summary = _summary(frame[frame["workload"] == workload], metrics, modes)
        if summary.empty:
            continue
        several = summary.apply(variant_label, axis=1).nunique() > 1

        def group(row: pd.Series, several: bool = several, prefix: str = prefix) -> str:
            name = str(row["metric"]).removeprefix(f"{prefix}_")
            return f"{name} {variant_label(row)}" if several else name

        texts = LATENCY_BARS.of(name=workload, title=LATENCY_TITLE[workload])
        text += _bar_section(summary, modes, group, texts, MICROSECONDS, run_dir) + "\n"
    return text


def _http(frame: pd.DataFrame, modes: list[str], run_dir: Path) -> str:
    rows = frame[(frame["workload"] == "http_fixed_qps") & frame["metric"].notna()]
    metrics = sorted({m for m in rows["metric"] if HTTP_PERCENTILE.search(str(m))})
    summary = _summary(rows, metrics, modes)
    if summary.empty:
        return ""
    text = "## HTTP latency at a fixed request rate (http_fixed_qps)\n\n"
    plotted = summary[summary["metric"].str.endswith(HTTP_PLOTTED)]
    for (placement, qps), part in plotted.groupby(
        ["placement", "qps"], sort=False
    ):  # same-node first
        unit = str(part["unit"].iloc[0])
        path = line_figure(
            _panels(part, "metric"),
            modes,
            x="connections",
            title=f"HTTP latency at {qps} requests/s, {placement}",
            scale=Scale(1.0, unit),
            path=run_dir / FIGURES_DIR / f"http_{placement}_{qps}qps.png",
        )
        text += _image(run_dir, path, f"HTTP latency against connections, {placement}, {qps} rps")
    unit = str(summary["unit"].iloc[0])
    return text + "\n" + markdown_table(summary, Scale(1.0, unit))


def _resources(frame: pd.DataFrame, modes: list[str], run_dir: Path) -> str:
    text = ""
    for metric, scale, name in (
        ("cpu_percent", VCPU, "cpu"),
        ("rss_max_bytes", MEGABYTES, "memory"),
    ):
        summary = _summary(frame, [metric], modes)
        if summary.empty:
            continue
        texts = PROXY_BARS.of(name=name)
        text += _bar_section(summary, modes, short_case_label, texts, scale, run_dir) + "\n"
    text += _cpu_per_rate(frame, modes)
    if not text:
        return ""
    note = (
        f"Mode `{BASELINE_MODE}` runs no proxies, so these figures have no ratio row; "
        "values are summed over every proxy process of the cluster.\n\n"
    )
    return "## Proxy CPU and memory\n\n" + note + text


def _cpu_per_rate(frame: pd.DataFrame, modes: list[str]) -> str:
    values = proxy_cpu_per_1000_rps(frame)
    if values.empty:
        return ""
    summary = add_ratio_to_baseline(summarize(values))
    if NATIVE in modes:
        summary = add_ratio_to_baseline(summary, NATIVE, name="ratio_native")
    summary = _order(with_steadiness(summary, frame), modes)
    title = "### Proxy vCPU per 1000 requests/s (http_fixed_qps)\n\n"
    return title + markdown_table(summary, Scale(1.0, "vCPU")) + "\n"


def _header(metadata: dict[str, Any], frame: pd.DataFrame) -> str:
    env = metadata.get("environment", {})
    tools = ", ".join(f"{k} {v}" for k, v in env.get("tools", {}).items())
    features = ", ".join(f"{k}: {v}" for k, v in env.get("kernel_features", {}).items())
    cases = frame.drop_duplicates("case_id")
    lines = [
        f"# Experiment {metadata.get('experiment', '?')}, run {metadata.get('run_id', '?')}",
        "",
        f"- status: {metadata.get('status', '?')}; cases ok: {(cases['status'] == 'ok').sum()}, "
        f"not ok: {(cases['status'] != 'ok').sum()}",
        f"- started {metadata.get('started_at', '?')}, finished {metadata.get('finished_at', '?')}",
        f"- kernel {env.get('kernel', '?')}; CPU {env.get('cpu_model', '?')} "
        f"x{env.get('cpu_count', '?')}; git {env.get('git_commit', '?')}",
        f"- tools: {tools}",
        f"- kernel features: {features}",
        f"- pinning: {metadata.get('pinning', {})}",
        f"- fallbacks and mode details: {', '.join(metadata.get('fallbacks', [])) or 'none'}",
        "",
        "Bars and points are medians over repetitions; whiskers span the lowest to the highest "
        f"repetition. Where the run has modes besides `{BASELINE_MODE}`, each figure's lower row "
        f"divides by `{BASELINE_MODE}`'s median of the same case in this run "
        "(1.0 = no difference). Where the run has the native peer (`native`: HAProxy as an "
        "mTLS tunnel node to node, on mode none's cluster), the tables also divide by its "
        f"median. {UNSTEADY_MARK} marks a case whose repetitions were not steady "
        f"(see {STEADINESS_ANCHOR}).",
        "",
    ]
    return "\n".join(lines) + "\n"


STEADINESS_HEADING = "## Steadiness of the repetitions"
STEADINESS_ANCHOR = f'"{STEADINESS_HEADING.removeprefix("## ")}"'


def steadiness_section(metadata: dict[str, Any]) -> str:
    """The rule the run judged its cases by, how many were steady, and every case that was
    not, from metadata.json (absent in runs from before it)."""
    found = metadata.get("steadiness")
    if not found:
        return ""
    series = found.get("series", {})
    counts: dict[str, int] = {}
    for item in series.values():
        counts[item["flag"]] = counts.get(item["flag"], 0) + 1
    auto = found.get("auto")
    rule = (
        f"repetitions: auto, {auto['min']}-{auto['max']} per case while the CV is above "
        f"{auto['cv']:.0%}, within a budget of {auto['budget']:g} s for extra repetitions "
        f"({found.get('extra_seconds', 0):g} s used)"
        if auto
        else f"a fixed count of repetitions; CV threshold {found.get('max_cv', 0):.0%}"
    )
    text = (
        f"{STEADINESS_HEADING}\n\n"
        f"Each case is judged on its workload's headline figure ({headline_metrics()}): "
        "noisy when the coefficient of variation over its repetitions is above the threshold, "
        "bimodal when they form two groups (the largest gap leaving two values each side, "
        "against the rest of the range; tested from 4 repetitions, at a 1 % false-alarm rate "
        f"for Gaussian noise). Rule: {rule}. Cases: "
        + ", ".join(f"{count} {flag}" for flag, count in sorted(counts.items()))
        + ".\n"
    )
    flagged = {sid: item for sid, item in series.items() if is_flagged(item["flag"])}
    if not flagged:
        return text + "\nEvery case with two or more repetitions was steady.\n"
    lines = ["", "| case | flag | n | CV | gap ratio | ended as |", "|---|---|---|---|---|---|"]
    for sid, item in sorted(flagged.items()):
        cv = "" if item["cv"] is None else f"{item['cv']:.1%}"
        gap = "" if item["gap_ratio"] is None else f"{item['gap_ratio']:.3g}"
        stop = STOP_MEANING.get(str(item["stop"]), str(item["stop"]))
        lines.append(f"| {sid} | {item['flag']} | {item['n']} | {cv} | {gap} | {stop} |")
    return text + "\n".join(lines) + "\n"


def _failures(frame: pd.DataFrame) -> str:
    failed = frame[frame["status"] != "ok"].drop_duplicates("case_id")
    if failed.empty:
        return ""
    lines = ["## Cases not measured\n", "| case | status | error |", "|---|---|---|"]
    for _, row in failed.iterrows():
        error = str(row["error"]).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {row['case_id']} | {row['status']} | {error} |")
    return "\n".join(lines) + "\n"


# Figures with a waterfall each, and the two the per-mode sentences speak of.
WATERFALLS = ("rr_p50", "cpu_per_gb", "cpu_per_1000_conn")
SENTENCES = ("rr_p50", "cpu_per_gb")
TABLE_ONLY = ("proxy_user_per_gb", "proxy_system_per_gb")
CAPTURE_ALONE = ("rr_p50", "cpu_per_gb")
STEP_COLUMNS = tuple(breakdown.STEP_NAMES.values())


def breakdown_markdown(table: pd.DataFrame, figure: breakdown.Figure) -> str:
    header = f"| mode | placement | {' | '.join(STEP_COLUMNS)} | total | largest step |\n"
    lines = [header + "|---" * (len(STEP_COLUMNS) + 4) + "|"]
    for _, row in table.iterrows():
        cells = [_number(row[column]) for column in STEP_COLUMNS]
        lines.append(
            f"| {row['mode']} | {row['placement']} | {' | '.join(cells)} "
            f"| {_number(row['total'])} | {row['dominant']} |"
        )
    return f"{figure.title}, {figure.unit}:\n\n" + "\n".join(lines) + "\n"


def _where_the_time_goes(frame: pd.DataFrame, modes: list[str], run_dir: Path) -> str:
    tables = {f.name: breakdown.breakdown_table(frame, f) for f in breakdown.FIGURES}
    if all(table.empty for table in tables.values()):
        return ""
    text = (
        "## Where the time goes\n\n"
        "Each meshed mode's paths ran on one cluster: `capture` (the server out of the mesh, "
        "the client's proxy passes TCP through without TLS), `hbone` (both ends enrolled), "
        "`waypoint` (a waypoint on the destination service); `direct` is mode none. A step is "
        "a path's median minus the previous path's (noise can make one negative). CPU is the "
        "whole machine's busy time (user, system, softirq), so kernel work a redirection adds "
        "counts; it includes the load tools and anything else running on the machine.\n\n"
    )
    for name in WATERFALLS:
        figure, table = breakdown.FIGURE_BY_NAME[name], tables[name]
        if table.empty:
            continue
        texts = WATERFALL.of(name=name, title=figure.title)
        text += _unit_figure(waterfall_figure, table, figure.unit, texts, run_dir) + "\n"
        text += breakdown_markdown(table, figure) + "\n"
    for name in TABLE_ONLY:
        if not tables[name].empty:
            text += breakdown_markdown(tables[name], breakdown.FIGURE_BY_NAME[name]) + "\n"
    meshed = [mode for mode in modes if mode not in (BASELINE_MODE, NATIVE)]
    for mode in meshed:
        said = [
            breakdown.dominant_sentence(mode, tables[name], breakdown.FIGURE_BY_NAME[name])
            for name in SENTENCES
            if not tables[name].empty
        ]
        text += f"- {' '.join(said)}\n" if said else ""
    return text + "\n" + _capture_alone(frame, run_dir)


def _capture_alone(frame: pd.DataFrame, run_dir: Path) -> str:
    text = ""
    for name in CAPTURE_ALONE:
        figure = breakdown.FIGURE_BY_NAME[name]
        costs = breakdown.capture_costs(frame, figure)
        if costs.empty:
            continue
        texts = CAPTURE_ALONE_INTERVALS.of(name=name, title=figure.title)
        text += _unit_figure(interval_figure, costs, figure.unit, texts, run_dir)
        for placement, part in costs.groupby("placement", sort=False):
            ranked = part.sort_values("cost")
            best = ranked.iloc[0]
            overlapping = [
                r["mode"] for _, r in ranked.iloc[1:].iterrows() if r["low"] <= best["high"]
            ]
            caveat = (
                f"; its interval overlaps {', '.join(overlapping)}'s, so no clear winner"
                if overlapping
                else ""
            )
            text += (
                f"\nCheapest redirection on this kernel by {figure.title}, {placement}: "
                f"**{best['mode']}** ({best['cost']:+.3g} {figure.unit}, 95 % interval "
                f"{best['low']:.3g} .. {best['high']:.3g}, {best['n']} repetitions{caveat}).\n"
            )
        text += "\n"
    if not text:
        return ""
    note = (
        "Intervals: percentile bootstrap over repetitions (each side resampled), so with 2-3 "
        "repetitions they are rough; overlapping intervals mean no measured difference.\n\n"
    )
    return "### Modes compared on capture alone\n\n" + note + text


SECTIONS = (_throughput, _latency, _http, _resources)


def write_report(run_dir: Path) -> Path:
    """Write run_dir/report.md and run_dir/figures/*.png; returns the report's path."""
    run_dir = Path(run_dir)
    frame = load(run_dir)
    series = label_paths(frame)  # the per-mode sections: one series per mode and path
    modes = mode_order(series)
    metadata = RunStore(run_dir).read_metadata()
    parts = [_header(metadata, frame), steadiness_section(metadata)]
    parts.append(_where_the_time_goes(frame, mode_order(frame), run_dir))
    parts.append(published_section(frame))
    parts += [section(series, modes, run_dir) for section in SECTIONS]
    parts.append(walks_section(run_dir, metadata))
    parts.append(_failures(frame))
    path = run_dir / REPORT_NAME
    path.write_text("\n".join(part for part in parts if part))
    return path
