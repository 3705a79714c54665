"""Bulk TCP throughput with iperf3 (JSON output)."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed.measure.errors import MeasureError
from testbed.measure.host import Host, Process
from testbed.measure.raw import save_raw
from testbed.measure.rows import Measurement
from testbed.measure.servers import run_client, serving

# Time for connection setup and the end-of-test exchange on top of the test's own duration.
CLIENT_GRACE = 30.0
SERVER_EXIT_TIMEOUT = 2.0
LABELS = {"tool": "iperf3"}


def parse_iperf3_json(text: str) -> list[Measurement]:
    """Rows from an iperf3 `-J` client report: throughput (bit/s, what the receiver got),
    retransmits (count, sender side), cpu_client and cpu_server (percent of one CPU-total).

    Raises MeasureError with iperf3's own message when the report carries an error."""
    data = _load_report(text)
    if "error" in data:
        raise MeasureError(f"iperf3: {data['error']}")
    end = data.get("end", {})
    try:
        received = end["sum_received"]
        sent = end["sum_sent"]
        cpu = end["cpu_utilization_percent"]
        return [
            Measurement("throughput", float(received["bits_per_second"]), "bit/s", LABELS),
            Measurement("retransmits", float(sent["retransmits"]), "count", LABELS),
            Measurement("cpu_client", float(cpu["host_total"]), "percent", LABELS),
            Measurement("cpu_server", float(cpu["remote_total"]), "percent", LABELS),
        ]
    except KeyError as missing:
        raise MeasureError(f"iperf3 report lacks {missing.args[0]!r} in end") from None


def _load_report(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise MeasureError(f"iperf3 output is not JSON ({error}): {text[:300]!r}") from None
    if not isinstance(data, dict):
        raise MeasureError(f"iperf3 output is not a JSON object: {text[:300]!r}")
    return data


def client_argv(
    server_ip: str,
    *,
    duration: float,
    parallel: int,
    port: int,
    reverse: bool,
    extra: Sequence[str],
) -> list[str]:
    argv = ["iperf3", "-c", server_ip, "-p", str(port), "-J", "-t", f"{duration:g}"]
    argv += ["-P", str(parallel)]
    if reverse:
        argv.append("-R")
    return [*argv, *extra]


def run_throughput(
    client: Host,
    server: Host,
    server_ip: str,
    *,
    duration: float = 10,
    parallel: int = 1,
    port: int = 5201,
    reverse: bool = False,
    extra: Sequence[str] = (),
    raw_dir: Path | None = None,
) -> list[Measurement]:
    """One iperf3 test from `client` to `server_ip` (a one-off server spawned in `server`).

    The raw client and server JSON go to `raw_dir` (iperf3-client.json, iperf3-server.json)
    when given."""
    argv = client_argv(
        server_ip, duration=duration, parallel=parallel, port=port, reverse=reverse, extra=extra
    )
    server_argv = ["iperf3", "-s", "-1", "-J", "-p", str(port)]
    with serving(server, server_argv, label=f"iperf3-server-{port}", port=port) as process:
        result = run_client(client, argv, timeout=duration + CLIENT_GRACE)
        if raw_dir is not None:
            save_raw(raw_dir, "iperf3-client.json", result.stdout)
            save_raw(raw_dir, "iperf3-server.json", _final_output(process))
    if not result.stdout.strip():
        raise MeasureError(f"iperf3 client exited with {result.returncode}: {result.stderr}")
    return parse_iperf3_json(result.stdout)


def _final_output(server: Process) -> str:
    """The one-off server's output once it has exited by itself (its JSON is then complete)."""
    # Still running means the test failed early; what it wrote so far is still worth keeping.
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=SERVER_EXIT_TIMEOUT)
    return server.output()
