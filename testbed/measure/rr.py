"""Request/response and connection-rate measurements with the project's own workload
(`testbed.workloads.rr`), run in the hosts through Host.spawn/run."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

from testbed.measure.errors import MeasureError
from testbed.measure.host import Host
from testbed.measure.raw import last_json_line, save_raw
from testbed.measure.rows import Measurement, Summary
from testbed.measure.servers import run_client, serving

CLIENT_GRACE = 30.0
WORKLOAD = [sys.executable, "-m", "testbed.workloads.rr"]


def parse_rr_json(text: str) -> list[Measurement]:
    """Rows from the rr client's JSON report.

    rr (label tool=rr): rtt_mean/_min/_max/_p50/_p90/_p99/_p99.9 (us), rtt_samples (count),
    request_rate (req/s).
    crr (label tool=crr): connect_rate (conn/s), errors (count), and the same statistics for
    connect_* (connect() time), rtt_* (request/response on the fresh connection) and
    transaction_* (connect to close), in us."""
    report = last_json_line(text, "rr client")
    if "error" in report:
        raise MeasureError(f"rr client: {report['error']}")
    try:
        if report["mode"] == "crr":
            return _crr_rows(report)
        return _rr_rows(report)
    except (KeyError, TypeError, ValueError) as error:
        raise MeasureError(f"malformed rr report ({error!r}): {text[:300]!r}") from None


def _rr_rows(report: dict[str, Any]) -> list[Measurement]:
    labels = {"tool": "rr"}
    rows = Summary.from_dict(report["rtt_us"]).measurements("rtt", "us", labels)
    rows.append(Measurement("request_rate", float(report["request_rate"]), "req/s", labels))
    return rows


def _crr_rows(report: dict[str, Any]) -> list[Measurement]:
    labels = {"tool": "crr"}
    rows = [
        Measurement("connect_rate", float(report["connect_rate"]), "conn/s", labels),
        Measurement("errors", float(report["errors"]), "count", labels),
    ]
    for name in ("connect", "rtt", "transaction"):
        rows += Summary.from_dict(report[f"{name}_us"]).measurements(name, "us", labels)
    return rows


def _run(
    client: Host,
    server: Host,
    server_ip: str,
    options: list[str],
    *,
    duration: float,
    port: int,
    raw_dir: Path | None,
) -> list[Measurement]:
    server_argv = [*WORKLOAD, "server", "--port", str(port)]
    argv = [*WORKLOAD, "client", "--host", server_ip, "--port", str(port), *options]
    argv += ["--duration", f"{duration:g}"]
    with serving(server, server_argv, label=f"rr-server-{port}", port=port):
        result = run_client(client, argv, timeout=duration + CLIENT_GRACE)
    save_raw(raw_dir, "rr-client.json", result.stdout)
    if not result.stdout.strip():
        raise MeasureError(f"rr client exited with {result.returncode}: {result.stderr}")
    return parse_rr_json(result.stdout)


def run_rr(
    client: Host,
    server: Host,
    server_ip: str,
    *,
    duration: float = 5,
    size: int = 64,
    port: int = 7777,
    new_connection: bool = False,
    raw_dir: Path | None = None,
) -> list[Measurement]:
    """Ping-pong of `size`-byte messages on one persistent TCP connection (TCP_RR-like), or
    with `new_connection` a new TCP connection for every request (TCP_CRR-like): rate and
    connect latency."""
    options = ["--size", str(size), *(["--new-connection"] if new_connection else [])]
    return _run(client, server, server_ip, options, duration=duration, port=port, raw_dir=raw_dir)


# A new TCP connection for every request (TCP_CRR-like).
run_crr = functools.partial(run_rr, new_connection=True)
