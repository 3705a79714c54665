"""Request/response latency with sockperf 3.7 ping-pong.

sockperf measures round trips; by default it prints each one halved ("avg-latency",
"Latency is"), with `--full-rtt` it prints them whole ("avg-rtt", "Round trip is").
`run_pingpong` always passes `--full-rtt`, and the parser names what it reads exactly:
`rtt_*` for full round trips, `half_rtt_*` for the halved default.
"""

from __future__ import annotations

import re
from pathlib import Path

from testbed.measure.errors import MeasureError
from testbed.measure.host import Host
from testbed.measure.raw import save_raw
from testbed.measure.rows import Measurement, percentile_name
from testbed.measure.servers import run_client, serving

CLIENT_GRACE = 30.0
LABELS = {"tool": "sockperf"}
# The largest message a sockperf 3.7 server takes unless told (its -m): UDP's maximum.
SERVER_DEFAULT_MAX_MESSAGE = 65507

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERROR = re.compile(r"sockperf: ERROR: (.*)")
_AVERAGE = re.compile(r"====> avg-(latency|rtt)=([\d.]+) \(std-dev=([\d.]+)\)")
_TOTAL = re.compile(r"Total (\d+) observations")
_PERCENTILE = re.compile(r"---> percentile ([\d.]+) =\s*([\d.]+)")
_EXTREME = re.compile(r"---> <(MAX|MIN)> observation =\s*([\d.]+)")
_VALID = re.compile(r"\[Valid Duration\] RunTime=([\d.]+) sec; .*ReceivedMessages=(\d+)")


def parse_sockperf_pingpong(text: str) -> list[Measurement]:
    """Rows from a sockperf ping-pong client report, in us: `<p>_mean`, `<p>_stddev`,
    `<p>_min`, `<p>_max`, `<p>_p25` ... `<p>_p99.999`, with `<p>` "rtt" (--full-rtt) or
    "half_rtt" (default); `<p>_samples` (count) and request_rate (req/s, valid period only).
    """
    text = _ANSI.sub("", text)
    errors = _ERROR.findall(text)
    if errors:
        raise MeasureError(f"sockperf: {'; '.join(errors)}")
    average = _AVERAGE.search(text)
    total = _TOTAL.search(text)
    valid = _VALID.search(text)
    if average is None or total is None or valid is None:
        raise MeasureError(f"no sockperf ping-pong statistics in: {text[-500:]!r}")
    prefix = "rtt" if average.group(1) == "rtt" else "half_rtt"
    values = {"mean": float(average.group(2)), "stddev": float(average.group(3))}
    for name, value in _EXTREME.findall(text):
        values[name.lower()] = float(value)
    for percentile, value in _PERCENTILE.findall(text):
        values[percentile_name(float(percentile))] = float(value)
    rows = [Measurement(f"{prefix}_{name}", v, "us", LABELS) for name, v in values.items()]
    rows.append(Measurement(f"{prefix}_samples", float(total.group(1)), "count", LABELS))
    runtime, received = float(valid.group(1)), int(valid.group(2))
    rows.append(Measurement("request_rate", received / runtime, "req/s", LABELS))
    return rows


def run_pingpong(
    client: Host,
    server: Host,
    server_ip: str,
    *,
    duration: int = 5,
    msg_size: int = 64,
    port: int = 11111,
    tcp: bool = True,
    raw_dir: Path | None = None,
) -> list[Measurement]:
    """sockperf ping-pong from `client` to a sockperf server spawned in `server`; round-trip
    rows (`rtt_*`). sockperf takes whole seconds; its statistics leave out about 0.45 s of
    them (warm-up, cool-down), and the client runs about 2 s longer than `duration` (start-up
    and a 0.4 s warm-up before it). The client's report goes to
    `raw_dir`/sockperf-client.txt when given."""
    protocol = ["--tcp"] if tcp else []
    # SO_REUSEADDR: a proxy in front of the server may leave the previous case's connection
    # in TIME-WAIT on the server's port, which would fail the next server's bind for 60 s.
    server_argv = ["sockperf", "server", *protocol, "-i", "0.0.0.0", "-p", str(port)]
    server_argv.append("--uc-reuseaddr")
    if msg_size > SERVER_DEFAULT_MAX_MESSAGE:  # it drops larger ones and resets the client
        server_argv += ["-m", str(msg_size)]
    argv = ["sockperf", "ping-pong", *protocol, "-i", server_ip, "-p", str(port)]
    argv += ["-t", str(duration), "-m", str(msg_size), "--full-rtt"]
    with serving(server, server_argv, label=f"sockperf-server-{port}", port=port, tcp=tcp):
        result = run_client(client, argv, timeout=duration + CLIENT_GRACE)
    # sockperf prints its report and its errors to stdout and exits 0 even on failure.
    report = result.stdout + result.stderr
    save_raw(raw_dir, "sockperf-client.txt", report)
    return parse_sockperf_pingpong(report)
