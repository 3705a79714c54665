"""Istio's published performance figures next to the same figures measured in a run.

The published numbers come from hardware and proxies that are not ours (Envoy and the Rust
ztunnel on multi-core nodes), so only their shape can be compared: each is set beside this
run's measurement and, where the published figure is relative to no mesh, beside this run's
ratio to its own baseline (mode none, path direct).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from testbed.experiment.analysis import BASELINE_MODE, measured, with_paths

ISTIO_122 = "Istio 1.22 docs, Performance and Scalability (ambient, 1 KiB HTTP at 1000 rps)"
ISTIO_124 = "Istio 1.24 docs, Performance and Scalability (CPU per 1000 rps)"
ISSUE_50373 = "istio/istio#50373 (iperf3, one stream across nodes)"
AMBIENT_MODES = ("inpod", "legacy", "ebpf")


@dataclass(frozen=True)
class Published:
    figure: str
    value: float
    unit: str
    source: str


PUBLISHED = {
    "http_p90_added": Published("p90 added by two ztunnels", 0.17, "ms", ISTIO_122),
    "http_p99_added": Published("p99 added by two ztunnels", 0.20, "ms", ISTIO_122),
    "ztunnel_vcpu": Published("ztunnel vCPU per 1000 rps", 0.06, "vCPU", ISTIO_124),
    "waypoint_vcpu": Published("waypoint vCPU per 1000 rps", 0.25, "vCPU", ISTIO_124),
    "sidecar_vcpu": Published("sidecar vCPU per 1000 rps", 0.20, "vCPU", ISTIO_124),
    "iperf_none": Published("iperf3 no mesh", 13.19, "Gbit/s", ISSUE_50373),
    "iperf_ambient": Published("iperf3 ambient", 12.21, "Gbit/s", ISSUE_50373),
    "iperf_sidecar": Published("iperf3 sidecar", 9.27, "Gbit/s", ISSUE_50373),
}


@dataclass(frozen=True)
class Comparison:
    key: str
    case: str  # which measured cases, e.g. "inpod hbone cross-node, 16 connections"
    measured: float
    measured_ratio: float | None  # to this run's baseline, where the figure has one
    published_ratio: float | None


def _median(rows: pd.DataFrame, metric: str) -> float | None:
    part = rows[rows["metric"] == metric]
    if part.empty:
        return None
    per_repetition = part.groupby("repetition")["value"].sum()
    return float(per_repetition.median())


def _cross_node(frame: pd.DataFrame) -> pd.DataFrame:
    rows = measured(with_paths(frame))
    cross = rows[rows["placement"] == "cross-node"]
    return cross if not cross.empty else rows


def http_comparisons(frame: pd.DataFrame) -> list[Comparison]:
    """Latency two ztunnels add (ambient modes, path hbone, minus none direct), per
    connection count, and each proxy role's vCPU per 1000 requests/s."""
    rows = _cross_node(frame)
    rows = rows[rows["workload"] == "http_fixed_qps"]
    out: list[Comparison] = []
    base_rows = rows[(rows["mode"] == BASELINE_MODE) & (rows["path"] == "direct")]
    for connections in sorted(rows["connections"].dropna().unique()):
        base = base_rows[base_rows["connections"] == connections]
        for mode in AMBIENT_MODES:
            case = rows[(rows["mode"] == mode) & (rows["path"] == "hbone")]
            case = case[case["connections"] == connections]
            for key, metric in (("http_p90_added", "http_p90"), ("http_p99_added", "http_p99")):
                ours, theirs = _median(case, metric), _median(base, metric)
                if ours is None or theirs is None:
                    continue
                label = f"{mode} hbone, {connections} connections"
                ratio = ours / theirs if theirs else None
                out.append(Comparison(key, label, ours - theirs, ratio, None))
    out += _cpu_comparisons(rows)
    return out


def _role(process: str) -> str:
    return process.split("-", 1)[0]


def _cpu_comparisons(rows: pd.DataFrame) -> list[Comparison]:
    """vCPU per 1000 rps per proxy on the path: the role's summed cpu_percent over the
    proxies of that role the request crosses (two ztunnels or sidecars, one waypoint)."""
    out: list[Comparison] = []
    wanted = (
        ("ztunnel_vcpu", "ztunnel", "hbone", 2),
        ("waypoint_vcpu", "waypoint", "waypoint", 1),
        ("sidecar_vcpu", "sidecar", "hbone", 2),
    )
    cpu = rows[rows["metric"] == "cpu_percent"]
    if cpu.empty or "process" not in cpu.columns:
        return out
    for key, role, path, crossed in wanted:
        part = cpu[(cpu["path"] == path) & (cpu["process"].map(_role) == role)]
        for (mode, connections), case in part.groupby(["mode", "connections"]):
            same = (rows["mode"] == mode) & (rows["path"] == path)
            rate = _median(rows[same & (rows["connections"] == connections)], "achieved_qps")
            vcpu = _median(case, "cpu_percent")
            if not rate or vcpu is None:
                continue
            value = vcpu / 100.0 / crossed / (rate / 1000.0)
            out.append(Comparison(key, f"{mode} {path}, {connections} connections", value, None,
                                  None))  # fmt: skip
    return out


def iperf_comparisons(frame: pd.DataFrame) -> list[Comparison]:
    """One iperf3 stream across nodes: none direct, ambient (hbone) and sidecar (hbone), each
    with its ratio to none, beside the published ratios to the published no-mesh figure."""
    rows = _cross_node(frame)
    rows = rows[(rows["workload"] == "tcp_stream") & (rows["parallel"] == 1)]
    base = _median(rows[(rows["mode"] == BASELINE_MODE) & (rows["path"] == "direct")], "throughput")
    out: list[Comparison] = []
    if base is None:
        return out
    none = PUBLISHED["iperf_none"].value
    out.append(Comparison("iperf_none", "none direct", base / 1e9, 1.0, 1.0))
    for mode in (*AMBIENT_MODES, "sidecar"):
        ours = _median(rows[(rows["mode"] == mode) & (rows["path"] == "hbone")], "throughput")
        if ours is None:
            continue
        key = "iperf_sidecar" if mode == "sidecar" else "iperf_ambient"
        published_ratio = PUBLISHED[key].value / none
        out.append(Comparison(key, f"{mode} hbone", ours / 1e9, ours / base, published_ratio))
    return out


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def published_section(frame: pd.DataFrame) -> str:
    """The report's "Published figures" section (empty when the run has none of them)."""
    comparisons = http_comparisons(frame) + iperf_comparisons(frame)
    if not comparisons:
        return ""
    lines = [
        "## Istio's published figures beside this run\n",
        "Published on other hardware with Istio's own proxies: compare the shape (ratios to "
        "the no-mesh baseline of the same run), not the absolute numbers.\n",
        "| figure | published | measured case | measured | measured / baseline "
        "| published / baseline | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for item in comparisons:
        figure = PUBLISHED[item.key]
        lines.append(
            f"| {figure.figure} | {figure.value:g} {figure.unit} | {item.case} "
            f"| {_cell(item.measured)} {figure.unit} | {_cell(item.measured_ratio)} "
            f"| {_cell(item.published_ratio)} | {figure.source} |"
        )
    return "\n".join(lines) + "\n"
