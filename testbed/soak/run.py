"""The soak driver: one testbed, mixed traffic and policy changes for DURATION, the proxies
sampled every few seconds, rows + plot + verdicts at the end (see testbed/soak/__init__.py).

The traffic and the policy changes run in threads, each a loop of short steps until the end;
a step that fails (a tool timing out on a loaded machine, connections denied by the policy
of the moment) is counted and the loop goes on: the soak is about what the proxies keep, not
about every request succeeding.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.cluster.cluster import Cluster, Pod
from testbed.cluster.loader import load_topology
from testbed.kube.documents import parse_resources
from testbed.kube.live import apply_to_cluster
from testbed.measure.errors import MeasureError
from testbed.measure.http import CLIENT_GRACE, LOAD, parse_http_load_json
from testbed.measure.iperf import run_throughput
from testbed.measure.rows import Measurement
from testbed.measure.rr import run_crr
from testbed.measure.servers import run_client
from testbed.netlab import NetlabError, Netns
from testbed.netlab.errors import TestbedError
from testbed.netlab.manifest import RUNS_ROOT
from testbed.redirect.registry import create_labelled_mode
from testbed.soak.leak import THRESHOLDS, Verdict, judge_rows
from testbed.soak.sample import ProxySampler, Row

IPERF_PORT, CHURN_PORT, HTTP_PORT = 5201, 7777, 9080
BULK_SECONDS, BULK_RATE = 5.0, "100M"  # capped: the machine is shared, the relay still works
CHURN_SECONDS, HTTP_SECONDS = 20.0, 30.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, None: 1}

# the policies switched on and off in turn, as a user would `testbed apply` them
L4_DENY: dict[str, Any] = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "soak-deny-churn", "namespace": "default"},
    "spec": {
        "selector": {"matchLabels": {"app": "reviews", "version": "v2"}},
        "action": "DENY",
        "rules": [{"to": [{"operation": {"ports": [str(CHURN_PORT)]}}]}],
    },
}
L7_DENY: dict[str, Any] = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "soak-deny-echo", "namespace": "default"},
    "spec": {
        "targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
        "action": "DENY",
        "rules": [{"to": [{"operation": {"paths": ["/echo"]}}]}],
    },
}


class SoakError(TestbedError, ValueError):
    """A bad soak option (named in the message)."""


def parse_duration(text: str) -> float:
    """ "600", "600s", "10m", "1.5h" -> seconds."""
    found = _DURATION.match(str(text))
    if found is None or float(found.group(1)) <= 0:
        raise SoakError(f"--duration {text!r}: expected a positive number of s, m or h (10m)")
    return float(found.group(1)) * _UNIT[found.group(2)]


@dataclass
class SoakOptions:
    duration: float = 600.0
    mode: str = "inpod"
    interval: float = 5.0  # between samples
    policy_period: float = 30.0  # between policy changes
    http_qps: int = 50
    out: Path = Path("results/soak")
    name: str = "soak"
    root: Path = RUNS_ROOT

    def check(self) -> None:
        if self.interval <= 0 or self.interval * 8 > self.duration:
            raise SoakError(
                f"--interval {self.interval:g}: expected > 0 and at most 1/8 of the duration"
            )
        if self.http_qps < 1:
            raise SoakError(f"--qps {self.http_qps}: expected at least 1")
        create_labelled_mode(self.mode)  # a bad mode: one error, before building anything


@dataclass
class Counts:
    """What the traffic and the policy loops did, added to from their threads."""

    values: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # the last failure of each loop
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str, amount: float = 1.0) -> None:
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def failed(self, loop: str, error: Exception) -> None:
        self.add(f"{loop}_failed_steps")
        with self.lock:
            self.errors[loop] = str(error)[:200]

    def get(self, key: str) -> float:
        with self.lock:
            return self.values.get(key, 0.0)


def _value(rows: list[Measurement], metric: str) -> float:
    return next((row.value for row in rows if row.metric == metric), 0.0)


@dataclass
class Soak:
    """The running soak's parts: the cluster, the pods the traffic uses, the counters."""

    cluster: Cluster
    options: SoakOptions
    client: Pod
    server: Pod  # reviews-v2: across the nodes from the client
    service_ip: str  # reviews' VIP: HTTP goes through the waypoint
    counts: Counts = field(default_factory=Counts)
    stop: threading.Event = field(default_factory=threading.Event)

    def bulk(self) -> None:
        rows = run_throughput(
            self.client, self.server, self.server.ip, duration=BULK_SECONDS, port=IPERF_PORT,
            extra=["-b", BULK_RATE],
        )  # fmt: skip
        self.counts.add("bulk_transfers")
        self.counts.add("bulk_bytes", _value(rows, "throughput") / 8 * BULK_SECONDS)
        self.stop.wait(BULK_SECONDS)

    def churn(self) -> None:
        rows = run_crr(self.client, self.server, self.server.ip, duration=CHURN_SECONDS,
                       port=CHURN_PORT)  # fmt: skip
        self.counts.add("connections_churned", round(_value(rows, "connect_rate") * CHURN_SECONDS))
        self.counts.add("churn_errors", _value(rows, "errors"))

    def http(self) -> None:
        # http_load alone (run_http_fixed_qps would start its own server): the reviews pods'
        # http-echo apps answer, behind the waypoint
        argv = [*LOAD, "--url", f"http://{self.service_ip}:{HTTP_PORT}/echo"]
        argv += ["--qps", str(self.options.http_qps), "--connections", "4"]
        argv += ["--duration", f"{HTTP_SECONDS:g}", "--payload", "1024", "--warmup", "0"]
        result = run_client(self.client, argv, timeout=HTTP_SECONDS + CLIENT_GRACE)
        if not result.stdout.strip():
            raise MeasureError(f"http_load exited with {result.returncode}: {result.stderr}")
        rows = parse_http_load_json(result.stdout)
        self.counts.add("http_requests", _value(rows, "requests"))
        self.counts.add("http_errors", _value(rows, "errors"))

    def policies(self) -> None:
        """One change: the L4 DENY on, off, the L7 DENY on, off, in turn."""
        if self.stop.wait(self.options.policy_period):
            return
        step = int(self.counts.get("policy_changes"))
        document = (L4_DENY, L7_DENY)[step // 2 % 2]
        apply_to_cluster(self.cluster, parse_resources([document]), delete=step % 2 == 1)
        self.counts.add("policy_changes")

    def loop(self, name: str, step: Callable[[], None]) -> None:
        while not self.stop.is_set():
            try:
                step()
            except (MeasureError, NetlabError, TestbedError) as exc:
                self.counts.failed(name, exc)
                self.stop.wait(1.0)


def proxies(cluster: Cluster) -> dict[str, int]:
    """The mode's proxies (ztunnels, waypoints, sidecars) and the CNI agents, by label."""
    found = dict(cluster.proxy_pids())
    if cluster.lab is not None:
        for process in cluster.lab.processes:
            if process.label.startswith("cni-agent") and process.poll() is None:
                found[process.label] = process.pid
    return found


def namespaces(cluster: Cluster) -> list[Netns]:
    pods = [*cluster.pods.values(), *cluster.system_pods.values()]
    return [node.netns for node in cluster.nodes.values()] + [pod.netns for pod in pods]


@dataclass(frozen=True)
class SoakResult:
    folder: Path
    verdicts: list[Verdict]
    counts: dict[str, float]
    errors: dict[str, str]
    summary: str

    @property
    def leaks(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.leaks]


def run_soak(options: SoakOptions, say: Callable[[str], None] = print) -> SoakResult:
    """Build, load, sample, judge; the rows, plot and summary go to a new folder of `out`."""
    from testbed.soak.report import write_outputs

    options.check()
    folder = options.out / f"{time.strftime('%Y%m%d-%H%M%S')}-{options.mode}".replace("+", "-")
    folder.mkdir(parents=True, exist_ok=True)
    topology = load_topology("reviews_waypoint")
    mode = create_labelled_mode(options.mode)
    cluster = Cluster(topology, mode, name=options.name, root=options.root)
    say(f"soak: building reviews_waypoint in mode {options.mode} ({options.name})")
    cluster.start()
    try:
        sampler, soak = _run_load(cluster, options, say)
    finally:
        cluster.stop()
    verdicts = judge_rows((r.proxy, r.metric, r.time_s, r.value) for r in sampler.rows)
    return write_outputs(folder, options, sampler.rows, verdicts, soak.counts, say)


def _run_load(
    cluster: Cluster, options: SoakOptions, say: Callable[[str], None]
) -> tuple[ProxySampler, Soak]:
    soak = Soak(
        cluster, options, cluster.pod("productpage"), cluster.pod("reviews-v2"),
        cluster.resolve_host("reviews"),
    )  # fmt: skip
    loops = {"bulk": soak.bulk, "churn": soak.churn, "http": soak.http, "policy": soak.policies}
    threads = [
        threading.Thread(target=soak.loop, args=(name, step), name=f"soak-{name}", daemon=True)
        for name, step in loops.items()
    ]
    sampler = ProxySampler(namespaces(cluster))
    started = time.monotonic()
    say(f"soak: {options.duration:g} s of traffic; proxies {', '.join(sorted(proxies(cluster)))}")
    for thread in threads:
        thread.start()
    try:
        next_report = started + 60
        while (now := time.monotonic()) < started + options.duration:
            sampler.sample(now - started, proxies(cluster))
            if now >= next_report:
                next_report += 60
                say(_progress(now - started, soak.counts))
            soak.stop.wait(max(0.0, options.interval - (time.monotonic() - now)))
        sampler.sample(time.monotonic() - started, proxies(cluster))
    finally:
        soak.stop.set()
        for thread in threads:
            thread.join(timeout=HTTP_SECONDS + CLIENT_GRACE + 10)
    return sampler, soak


def _progress(elapsed: float, counts: Counts) -> str:
    return (
        f"soak: {elapsed:.0f} s: {counts.get('connections_churned'):.0f} connections churned, "
        f"{counts.get('http_requests'):.0f} HTTP requests, {counts.get('bulk_transfers'):.0f} "
        f"bulk transfers, {counts.get('policy_changes'):.0f} policy changes"
    )


__all__ = ["THRESHOLDS", "Row", "SoakError", "SoakOptions", "SoakResult", "run_soak"]
