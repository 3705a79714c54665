"""Fakes for the experiment tests: a cluster, pods and workloads that need no root.

(No tests here; the module is shared by the test_experiment_* and test_report modules.)
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from testbed.experiment.cases import Case
from testbed.experiment.peers import PeerEndpoint
from testbed.experiment.runner import Runner
from testbed.experiment.spec import ExperimentSpec, load_spec
from testbed.experiment.store import RunStore
from testbed.experiment.walks import real_tracer
from testbed.measure.resources import ResourceSampler
from testbed.measure.rows import Measurement

SMALL_SPEC = """
name: small
topology: two_nodes
modes: [none, inpod]
workloads: [tcp_stream]
placements: [same-node]
repetitions: 2
warmup: 1
duration: 2
sample_interval: 0.05
"""

# Throughput (bit/s) per mode: inpod costs a third, as a proxy in the path would.
THROUGHPUT = {"none": 10e9, "inpod": 6.6e9, "sidecar": 5e9, "native": 4e9}


@dataclass
class FakePod:
    name: str
    ip: str
    node: str
    commands: list[list[str]] = field(default_factory=list)

    def run(self, argv: Sequence[str], **_: Any) -> subprocess.CompletedProcess[str]:
        self.commands.append(list(argv))
        return subprocess.CompletedProcess(list(argv), 0, "", "")

    def spawn(self, argv: Sequence[str], **_: Any) -> object:
        self.commands.append(list(argv))
        return object()


@dataclass
class FakeCluster:
    topology: str
    mode: str
    mode_options: dict[str, Any]
    log: list[str]
    fail_build: bool = False
    pods: list[FakePod] = field(default_factory=list)

    def __enter__(self) -> FakeCluster:
        self.log.append(f"build {self.mode}")
        if self.fail_build:
            raise RuntimeError("no such kernel feature")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.log.append(f"teardown {self.mode}")

    def pair(self, placement: str) -> tuple[FakePod, FakePod]:
        server_node = "node1" if placement == "same-node" else "node2"
        pair = (
            FakePod("client", "10.244.1.2", "node1"),
            FakePod("server", "10.244.2.2", server_node),
        )
        self.pods.extend(pair)
        return pair

    def proxy_pids(self) -> dict[str, int]:
        # A real process to sample: this test process stands in for a ztunnel.
        return {} if self.mode == "none" else {"ztunnel-node1": os.getpid()}

    def facts(self) -> dict[str, str]:
        facts = {"mode": self.mode}
        return facts if self.mode == "none" else {**facts, "tunnel": "vxlan"}


class FakeClusterFactory:
    def __init__(self, fail_modes: Sequence[str] = ()) -> None:
        self.log: list[str] = []
        self.clusters: list[FakeCluster] = []
        self.fail_modes = set(fail_modes)

    def __call__(self, topology: str, *, mode: str, mode_options: dict[str, Any]) -> FakeCluster:
        cluster = FakeCluster(topology, mode, dict(mode_options), self.log, mode in self.fail_modes)
        self.clusters.append(cluster)
        return cluster


def fake_stream(client: Any, server: Any, case: Case, raw_dir: Path | None) -> list[Measurement]:
    """Throughput per mode, with a repetition-dependent wobble of 1 %."""
    client.run(["iperf3", "-c", server.ip])
    if raw_dir is not None:
        (raw_dir / "iperf3-client.json").write_text("{}")
    value = THROUGHPUT[case.mode] * (1 + 0.01 * case.repetition)
    return [Measurement("throughput", value, "bit/s", {"tool": "fake"})]


def fake_rr(client: Any, server: Any, case: Case, raw_dir: Path | None) -> list[Measurement]:
    base = {"none": 60.0, "inpod": 110.0, "sidecar": 150.0}[case.mode]
    return [
        Measurement(f"rtt_{p}", base * factor + case.repetition, "us", {"tool": "fake"})
        for p, factor in (("p50", 1.0), ("p90", 1.2), ("p99", 1.5), ("p99.9", 2.0))
    ]


def fake_http(client: Any, server: Any, case: Case, raw_dir: Path | None) -> list[Measurement]:
    base = {"none": 0.2, "inpod": 0.4, "sidecar": 0.6}[case.mode] * (
        1 + (case.connections or 1) / 16
    )
    rows = [
        Measurement(f"http_{p}", base * factor, "ms", {})
        for p, factor in (("p50", 1.0), ("p90", 1.3), ("p99", 1.8), ("p999", 2.5))
    ]
    return [*rows, Measurement("achieved_qps", float(case.qps or 0), "req/s", {})]


FAKE_WORKLOADS = {"tcp_stream": fake_stream, "tcp_rr": fake_rr, "http_fixed_qps": fake_http}


def write_spec(folder: Path, text: str = SMALL_SPEC, name: str = "small.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def load_fake_spec(folder: Path, text: str = SMALL_SPEC) -> tuple[Path, ExperimentSpec]:
    path = write_spec(folder, text)
    return path, load_spec(path)


class FakePaths:
    """Records path switches; the waypoint path addresses a made-up service VIP."""

    def __init__(self) -> None:
        self.switches: list[tuple[str, list[str]]] = []

    def topology(self, topology: str, paths: Sequence[str]) -> str:
        return f"{topology}+waypoint" if "waypoint" in paths else topology

    def facts(self, cluster: Any) -> dict[str, str]:
        return {"topology_variant": "+waypoint"} if "waypoint" in cluster.topology else {}

    def switch(self, cluster: Any, path: str, servers: Sequence[Any]) -> None:
        self.switches.append((path, [server.node for server in servers]))

    def destination(self, cluster: Any, path: str, server: Any) -> Any:
        if path != "waypoint":
            return server
        return FakePod(server.name, "10.96.0.99", server.node, server.commands)


class FakePeers:
    """Stands in for the HAProxy tunnel: records each start and stop, the client reaches
    a made-up node address, this test process stands in for both HAProxy sides."""

    ADDRESS = "192.168.10.1"

    def __init__(self) -> None:
        self.log: list[str] = []

    @contextmanager
    def __call__(self, peer: str, cluster: Any, client: Any, server: Any) -> Iterator[Any]:
        self.log.append(f"start {peer} {client.node}->{server.node} on {cluster.mode}")
        try:
            yield PeerEndpoint(self.ADDRESS, {"haproxy-client": os.getpid()})
        finally:
            self.log.append(f"stop {peer}")


def fake_runner(
    spec: ExperimentSpec,
    store: RunStore,
    factory: FakeClusterFactory,
    workloads: dict[str, Any] | None = None,
    paths: FakePaths | None = None,
    tracer: Any | None = None,
    peers: FakePeers | None = None,
    clock: Callable[[], float] | None = None,
) -> Runner:
    # A fake cluster has nothing to trace: tests that do not pass a tracer trace nothing.
    if tracer is None:
        spec = spec.model_copy(update={"trace": False})
    return Runner(
        spec,
        store,
        cluster_factory=factory,
        sampler_factory=lambda pids, interval: ResourceSampler(pids, interval, machine=True),
        workloads=workloads or FAKE_WORKLOADS,
        paths=paths or FakePaths(),
        show_progress=False,
        tracer=tracer or real_tracer,
        peer_factory=peers or FakePeers(),  # never a real HAProxy from a unit test
        **({"clock": clock} if clock else {}),
    )
