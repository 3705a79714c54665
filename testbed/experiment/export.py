"""A run's results in the field's formats: fortio result JSON and SMP documents.

- fortio: one file per HTTP case and repetition, from http_load's raw report, with fortio's
  field names (RunType, Labels, StartTime, RequestedQPS, RequestedDuration, ActualQPS,
  ActualDuration in ns, NumThreads, DurationHistogram {Count, Min, Max, Sum, Avg, StdDev,
  Data [{Start, End, Percent, Count}], Percentiles [{Percentile, Value}]} in seconds,
  RetCodes by status, -1 for connection errors as fortio counts them), so fortio's report
  viewer and scripts read them. The histogram's buckets are http_load's 1-2-5 ones; Sum, Avg
  and StdDev are exact when the report held raw latencies, else from bucket midpoints.
- smp: one Service Mesh Performance document per HTTP case and repetition: the
  PerformanceTestResult (smp_version, id, labels, start_time, end_time, latencies_ms {min,
  average, p50, p90, p99, max}, actual_QPS) and a ServiceMeshConfig whose per-role blocks
  (SMP has `sidecar`; `ztunnel` and `waypoint` are this testbed's additions in the same shape:
  count, cpu_mCores, mem_mb, rps) hold the CPU and memory SMP results otherwise lack.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from testbed.experiment.analysis import measured, with_paths
from testbed.experiment.store import RunStore
from testbed.netlab.errors import TestbedError
from testbed.results import load

Format = Literal["fortio", "smp"]
FORMATS: tuple[str, ...] = ("fortio", "smp")
HTTP_WORKLOADS = ("http_fixed_qps", "http_crr")
SMP_VERSION = "v0.0.1"
FORTIO_PERCENTILES = (50.0, 75.0, 90.0, 99.0, 99.9)
RAW_NAME = "http-load.json"


class ExportError(TestbedError):
    """A run that cannot be exported (no results, unknown format)."""


def _http_reports(run_dir: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(case_id, repetition, http_load report) for every HTTP case with raw output."""
    frame = with_paths(load(run_dir))
    cases = frame[frame["workload"].isin(HTTP_WORKLOADS)].drop_duplicates("case_id")
    for _, case in cases.iterrows():
        for raw in sorted((run_dir / "raw" / str(case["case_id"])).glob("http-load*.json")):
            lines = raw.read_text().strip().splitlines()
            if lines:
                yield str(case["case_id"]), int(case["repetition"]), json.loads(lines[-1])


def _histogram_seconds(report: dict[str, Any]) -> dict[str, Any]:
    buckets = [(int(bound), int(count)) for bound, count in report.get("histogram_us", [])]
    summary = report.get("latency_us", {})
    total = sum(count for _, count in buckets)
    data: list[dict[str, Any]] = []
    previous, seen = float(summary.get("min", 0.0)), 0  # the first bucket starts at the minimum
    for bound, count in buckets:
        seen += count
        start = min(previous, float(bound))
        data.append(
            {
                "Start": start / 1e6,
                "End": bound / 1e6,
                "Percent": 100.0 * seen / total,
                "Count": count,
            }
        )
        previous = float(bound)
    raw = report.get("raw_latencies_us")
    if raw:
        values = [v / 1e6 for v in raw]
    else:  # bucket midpoints, one per request
        values = [((d["Start"] + d["End"]) / 2) for d in data for _ in range(d["Count"])]
    mean = sum(values) / len(values) if values else 0.0
    stddev = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if values else 0.0
    percentiles = [
        {"Percentile": p, "Value": float(summary[key]) / 1e6}
        for p in FORTIO_PERCENTILES
        if (key := f"p{p:g}") in summary
    ]
    return {
        "Count": int(summary.get("count", total)),
        "Min": float(summary.get("min", 0.0)) / 1e6,
        "Max": float(summary.get("max", 0.0)) / 1e6,
        "Sum": float(summary.get("mean", mean * 1e6)) / 1e6 * int(summary.get("count", total)),
        "Avg": float(summary.get("mean", mean * 1e6)) / 1e6,
        "StdDev": stddev,
        "Data": data,
        "Percentiles": percentiles,
    }


def fortio_result(report: dict[str, Any], labels: str, start_time: str) -> dict[str, Any]:
    """One http_load report as fortio's HTTP result JSON."""
    codes: dict[str, int] = {}
    errors = report.get("errors", {})
    failed = 0
    for kind, count in errors.items():
        if kind.startswith("status_"):
            codes[kind.removeprefix("status_")] = int(count)
        else:
            failed += int(count)
    ok = int(report.get("responses", 0)) - sum(codes.values())
    codes = {"200": ok, **codes} if ok else codes
    if failed:
        codes["-1"] = failed
    window = float(report.get("window_s", report.get("duration_s", 0.0)))
    return {
        "RunType": "HTTP",
        "Labels": labels,
        "StartTime": start_time,
        "RequestedQPS": f"{report.get('target_qps', 0):g}",
        "RequestedDuration": f"{report.get('duration_s', 0):g}s",
        "ActualQPS": float(report.get("achieved_qps", 0.0)),
        "ActualDuration": int(window * 1e9),
        "NumThreads": int(report.get("connections", 1)),
        "Version": "testbed http_load",
        "DurationHistogram": _histogram_seconds(report),
        "Exactly": 0,
        "RetCodes": codes,
        "URL": report.get("url", ""),
        "SocketCount": int(report.get("responses", 0))
        if report.get("new_connection")
        else int(report.get("connections", 1)),
    }


def export_fortio(run_dir: Path, out: Path) -> list[Path]:
    frame = load(run_dir)
    started = frame.drop_duplicates("case_id").set_index("case_id")["started_at"]
    written = []
    for case_id, _repetition, report in _http_reports(run_dir):
        labels = f"{run_dir.name} {case_id}"
        path = out / f"{case_id}.json"
        path.write_text(json.dumps(fortio_result(report, labels, str(started[case_id])), indent=1))
        written.append(path)
    return written


def _role(process: str) -> str:
    return process.split("-", 1)[0]


def _roles(rows: pd.DataFrame, rps: float) -> dict[str, dict[str, float | int]]:
    """Per proxy role: count, cpu_mCores (summed), mem_mb (summed max RSS), rps."""
    if "process" not in rows.columns:
        return {}
    cpu = rows[rows["metric"] == "cpu_percent"]
    rss = rows[rows["metric"] == "rss_max_bytes"]
    roles: dict[str, dict[str, float | int]] = {}
    cpu_roles = cpu["process"].fillna("").astype(str).map(_role)
    rss_roles = rss["process"].fillna("").astype(str).map(_role)
    for role in sorted(set(cpu_roles) - {"", "machine"}):
        mine = cpu[cpu_roles == role]
        roles[role] = {
            "count": int(mine["process"].nunique()),
            "cpu_mCores": round(float(mine["value"].sum()) * 10),  # percent of a CPU -> mCores
            "mem_mb": round(float(rss[rss_roles == role]["value"].sum()) / 1e6),
            "rps": round(rps) if rps == rps else 0,
        }
    return roles


def smp_documents(run_dir: Path) -> list[dict[str, Any]]:
    frame = measured(with_paths(load(run_dir)))
    metadata = RunStore(run_dir).read_metadata()
    docs = []
    http = frame[frame["workload"].isin(HTTP_WORKLOADS)]
    for case_id, rows in http.groupby("case_id", sort=False):
        first = rows.iloc[0]
        values = rows.groupby("metric")["value"].sum()

        def metric(name: str, rows_sum: pd.Series = values) -> float:
            return float(rows_sum.get(name, float("nan")))

        rps = metric("achieved_qps")
        labels = {
            "mode": str(first["mode"]),
            "path": str(first["path"]),
            "placement": str(first["placement"]),
            "workload": str(first["workload"]),
            "connections": str(first["connections"]),
            "run": run_dir.name,
        }
        result = {
            "smp_version": SMP_VERSION,
            "id": str(case_id),
            "labels": labels,
            "start_time": str(first["started_at"]),
            "end_time": str(metadata.get("finished_at", "")),
            "latencies_ms": {
                "min": None,
                "average": metric("http_mean"),
                "p50": metric("http_p50"),
                "p90": metric("http_p90"),
                "p99": metric("http_p99"),
                "max": metric("http_max"),
            },
            "actual_QPS": rps,
            "details_uri": f"raw/{case_id}/{RAW_NAME}",
            "testId": str(metadata.get("run_id", run_dir.name)),
            "meshConfigId": str(first["mode"]),
            "envId": str(metadata.get("environment", {}).get("kernel", "")),
        }
        roles = _roles(rows, rps)
        mesh_config = {
            "smp_version": SMP_VERSION,
            "id": str(first["mode"]),
            "labels": {"path": str(first["path"])},
            "mtls_enabled": str(first["path"]) in ("hbone", "waypoint"),
            **roles,
        }
        docs.append({"performance_test_result": result, "service_mesh_config": mesh_config})
    return docs


def export_run(run_dir: Path, fmt: str, out: Path | None = None) -> list[Path]:
    """Write the run in `fmt` under `out` (default RUN/export/<fmt>); returns the files."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not (run_dir / "results.csv").exists():
        raise ExportError(f"{run_dir}: not a results directory (no results.csv)")
    out = out or run_dir / "export" / fmt
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "fortio":
        written = export_fortio(run_dir, out)
    else:
        path = out / "smp.json"
        path.write_text(json.dumps(_finite(smp_documents(run_dir)), indent=1))
        written = [path]
    if not written:
        raise ExportError(f"{run_dir}: no HTTP cases to export as {fmt}")
    return written


def _finite(value: Any) -> Any:
    """JSON has no NaN: a figure a case lacks becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
