"""HTTP at a fixed request rate (Istio's method): the project's `http_echo`
in the server host, `http_load` (open model, free of coordinated omission) in the client host."""

from __future__ import annotations

import sys
from pathlib import Path

from testbed.measure.errors import MeasureError
from testbed.measure.host import Host
from testbed.measure.raw import last_json_line, save_raw
from testbed.measure.rows import Measurement
from testbed.measure.servers import run_client, serving

CLIENT_GRACE = 30.0
ECHO = [sys.executable, "-m", "testbed.workloads.http_echo"]
LOAD = [sys.executable, "-m", "testbed.workloads.http_load"]
# http_load's latency keys -> metric names (all reported in ms).
LATENCY_METRICS = {
    "p50": "http_p50",
    "p90": "http_p90",
    "p99": "http_p99",
    "p99.9": "http_p999",
    "mean": "http_mean",
    "max": "http_max",
}


def parse_http_load_json(text: str) -> list[Measurement]:
    """Rows from http_load's JSON report (labels tool=http_load, protocol=http/1.1|h2):
    http_p50/_p90/_p99/_p999/_mean/_max (ms; absent when no response came back),
    achieved_qps (req/s), errors and requests (count); with a new connection per request
    also connect_p50/_p90/_p99/_p999/_mean/_max (ms)."""
    report = last_json_line(text, "http_load")
    try:
        labels = {"tool": "http_load", "protocol": str(report["protocol"])}
        latency = report["latency_us"]
        rows = [
            Measurement(metric, float(latency[key]) / 1000.0, "ms", labels)
            for key, metric in LATENCY_METRICS.items()
            if latency["count"]
        ]
        connect = report.get("connect_latency_us") or {"count": 0}
        rows += [
            Measurement(
                metric.replace("http_", "connect_"), float(connect[key]) / 1000, "ms", labels
            )
            for key, metric in LATENCY_METRICS.items()
            if connect["count"]
        ]
        rows += [
            Measurement("achieved_qps", float(report["achieved_qps"]), "req/s", labels),
            Measurement("errors", float(report["error_count"]), "count", labels),
            Measurement("requests", float(report["requests"]), "count", labels),
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise MeasureError(f"malformed http_load report ({error!r}): {text[:300]!r}") from None
    return rows


def run_http_fixed_qps(
    client: Host,
    server: Host,
    server_ip: str,
    *,
    qps: int,
    connections: int,
    duration: float,
    payload: int = 1024,
    port: int = 8080,
    http2: bool = False,
    warmup: float = 1.0,
    new_connection: bool = False,
    raw_dir: Path | None = None,
) -> list[Measurement]:
    """`qps` requests/s of `payload`-byte POSTs over `connections` keep-alive connections (or,
    with `new_connection`, as many concurrent one-request connections) for `warmup` +
    `duration` seconds; only the last `duration` seconds are recorded."""
    server_argv = [*ECHO, "--port", str(port)]
    name = getattr(server, "name", None)  # a Pod has one: it shows up in x-served-by
    if isinstance(name, str):
        server_argv += ["--name", name]
    host = f"[{server_ip}]" if ":" in server_ip else server_ip
    argv = [*LOAD, "--url", f"http://{host}:{port}/echo", "--qps", str(qps)]
    argv += ["--connections", str(connections), "--duration", f"{duration:g}"]
    argv += ["--payload", str(payload), "--warmup", f"{warmup:g}"]
    argv += [*(["--new-connection"] if new_connection else []), *(["--http2"] if http2 else [])]
    with serving(server, server_argv, label="http-echo", port=port):
        result = run_client(client, argv, timeout=warmup + duration + CLIENT_GRACE)
    save_raw(raw_dir, "http-load.json", result.stdout)
    if result.returncode != 0 or not result.stdout.strip():
        raise MeasureError(f"http_load exited with {result.returncode}: {result.stderr[-500:]}")
    return parse_http_load_json(result.stdout)
