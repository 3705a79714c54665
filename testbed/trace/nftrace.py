"""Per-flow netfilter evidence: nftables tracing in the namespaces on the path.

For the trace's own source port, a table `inet testbed-trace-<port>` sets `meta nftrace`
on every packet to or from that port at the first hook (priority -350), and
`xtables-monitor --trace` reports each rule such a packet met, with its verdict: iptables
rules (iptables-nft) in iptables' own syntax, nft-native rules by table, chain and handle.
Only packets carrying the trace's port are traced: the client's leg up to the first proxy
(the whole path in mode none); legs a proxy opens have ports of their own and keep
counter evidence. The table is removed afterwards; it lives in the testbed's namespaces
only, so a crash leaves at most a table that goes with the namespace.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from testbed.netlab import Netns
from testbed.netlab.process import nsenter_argv
from testbed.trace.netfilter import RuleCount

WORKERS = 8
READY_TIMEOUT = 3.0  # for a monitor to show a probe packet (it has no ready signal)
_PROBE = "SRC=127.0.0.1 DST=127.0.0.1"  # probe packets: loopback to the trace's port
_PACKET = re.compile(r"^PACKET: \d+ ([0-9a-f]+) (.*)$")
_TRACE = re.compile(
    r"^\s*TRACE: \d+ ([0-9a-f]+) ([^:\s]+):([^:\s]+):rule:0x([0-9a-f]+):(\S+)\s*(.*)$"
)
_IPTABLES_SPEC = re.compile(r"^-[46] -t \S+ -A \S+ (.*)$")


@dataclass(frozen=True)
class TraceEvent:
    """A traced packet met a rule: table (no family), chain, nft handle, verdict."""

    packet: str  # trace id: one packet at one hook
    table: str
    chain: str
    handle: int
    verdict: str
    spec: str  # iptables spec for iptables-nft rules, "" for nft-native ones


def table_name(port: int) -> str:
    return f"testbed-trace-{port}"


def rules_script(port: int) -> str:
    """`nft -f` input for the tracing table of one trace."""
    table = f"inet {table_name(port)}"
    lines = [f"add table {table}"]
    for chain, hook in (("pre", "prerouting"), ("out", "output")):
        lines.append(f"add chain {table} {chain} {{ type filter hook {hook} priority -350; }}")
        for side in ("sport", "dport"):
            lines.append(f"add rule {table} {chain} tcp {side} {port} meta nftrace set 1")
    return "\n".join(lines) + "\n"


def parse_events(text: str, port: int) -> list[TraceEvent]:
    """Rule events of packets to or from `port` in `xtables-monitor --trace` output, except
    the tracing table's own rules."""
    wanted: set[str] = set()
    events = []
    marker = re.compile(rf"\b[SD]PORT={port}\b")
    for line in text.splitlines():
        packet = _PACKET.match(line)
        if packet:
            if marker.search(packet.group(2)) and _PROBE not in packet.group(2):
                wanted.add(packet.group(1))
            continue
        match = _TRACE.match(line)
        if not match or match.group(1) not in wanted:
            continue
        trace_id, table, chain, handle, verdict, rest = match.groups()
        if table == table_name(port):
            continue
        spec = _IPTABLES_SPEC.match(rest.strip())
        events.append(
            TraceEvent(
                trace_id, table, chain, int(handle, 16), verdict, spec.group(1) if spec else ""
            )
        )
    return events


def packets_meeting(rule: RuleCount, events: Iterable[TraceEvent]) -> int:
    """How many traced packets met `rule` (iptables rules by spec, nft ones by handle)."""
    family_table = rule.table.split()[-1]
    packets = set()
    for event in events:
        if event.table != family_table or event.chain != rule.chain:
            continue
        same = (
            event.spec == rule.spec if rule.backend == "iptables" else (event.handle == rule.handle)
        )
        if same:
            packets.add(event.packet)
    return len(packets)


class Tracing:
    """Tracing tables and monitors in a set of namespaces, for one trace's port."""

    def __init__(self, namespaces: Iterable[Netns], port: int) -> None:
        self.port = port
        self.namespaces = list(namespaces)
        self.monitors: dict[str, subprocess.Popen[str]] = {}
        self.output: dict[str, list[str]] = {}
        self.readers: list[threading.Thread] = []
        self.events: dict[str, list[TraceEvent]] = {}
        self.untraced: list[str] = []  # namespaces whose monitor never showed the probe

    def start(self) -> None:
        """Monitors first, then the tables; returns once each monitor has shown a probe
        packet (loopback to the trace's port, left out of the evidence)."""
        for ns in self.namespaces:
            monitor = subprocess.Popen(
                nsenter_argv(ns.path, ["xtables-monitor", "--trace"]),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self.monitors[ns.name] = monitor
            lines: list[str] = []
            self.output[ns.name] = lines
            reader = threading.Thread(target=_collect, args=(monitor, lines), daemon=True)
            reader.start()
            self.readers.append(reader)
        script = rules_script(self.port)
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(lambda ns: ns.run(["nft", "-f", "-"], input=script), self.namespaces))
            ready = list(pool.map(self._await_probe, self.namespaces))
        self.untraced = [ns.name for ns, ok in zip(self.namespaces, ready, strict=True) if not ok]

    def _await_probe(self, ns: Netns) -> bool:
        marker = f"DPORT={self.port} "
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            with ns.entered():
                probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with probe:
                probe.settimeout(0.2)
                with contextlib.suppress(OSError):  # refused: the SYN is all a probe needs
                    probe.connect(("127.0.0.1", self.port))
            time.sleep(0.05)
            if any(_PROBE in line and marker in line for line in list(self.output[ns.name])):
                return True
        return False

    def stop(self) -> None:
        argv = ["nft", "delete", "table", "inet", table_name(self.port)]
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(lambda ns: ns.run(argv, check=False), self.namespaces))
        for monitor in self.monitors.values():
            monitor.terminate()
        for monitor in self.monitors.values():
            try:
                monitor.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                monitor.kill()
                monitor.wait()
        for reader in self.readers:
            reader.join(timeout=2.0)
        for name, lines in self.output.items():
            self.events[name] = parse_events("".join(lines), self.port)


def _collect(monitor: subprocess.Popen[str], lines: list[str]) -> None:
    assert monitor.stdout is not None
    for line in monitor.stdout:
        lines.append(line)
