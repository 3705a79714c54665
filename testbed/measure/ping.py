"""ICMP round trips with iputils ping: a quick reachability and base-latency check."""

from __future__ import annotations

import re

from testbed.measure.errors import MeasureError
from testbed.measure.host import Host
from testbed.measure.rows import Measurement
from testbed.measure.servers import run_client

LABELS = {"tool": "ping"}
US_PER_MS = 1000.0
# Seconds to wait for the last reply, then for the command as a whole on top of its sending.
REPLY_WAIT = 1
RUN_GRACE = 10.0

_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) received.*?([\d.]+)% packet loss")
_RTT = re.compile(r"rtt min/avg/max/mdev = ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


def parse_ping(text: str) -> list[Measurement]:
    """Rows from iputils ping's summary: packet_loss (percent), rtt_samples (count, replies),
    and when any reply came: rtt_min, rtt_mean, rtt_max, rtt_mdev (us)."""
    counts = _COUNTS.search(text)
    if counts is None:
        raise MeasureError(f"ping: {text.strip()[-300:]}")
    received, loss = int(counts.group(2)), float(counts.group(3))
    rows = [
        Measurement("packet_loss", loss, "percent", LABELS),
        Measurement("rtt_samples", float(received), "count", LABELS),
    ]
    rtt = _RTT.search(text)
    if rtt is not None:
        names = ("rtt_min", "rtt_mean", "rtt_max", "rtt_mdev")
        rows += [
            Measurement(name, float(ms) * US_PER_MS, "us", LABELS)
            for name, ms in zip(names, rtt.groups(), strict=True)
        ]
    return rows


def run_ping(client: Host, ip: str, count: int = 5, interval: float = 0.2) -> list[Measurement]:
    """Ping `ip` from `client` `count` times; a lost packet is a row, not an error."""
    argv = ["ping", "-n", "-c", str(count), "-i", f"{interval:g}", "-W", str(REPLY_WAIT), ip]
    # ping exits 1 when replies are missing and 2 on errors; the parser tells them apart.
    result = run_client(client, argv, timeout=count * interval + RUN_GRACE)
    return parse_ping(result.stdout + result.stderr)
