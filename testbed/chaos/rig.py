"""A chaos rig: the chaos topology built with a mode, its flows, and the faults it can inject.

    rig = Rig.build("inpod", name="chaos1", root=Path("/run/testbed-chaos"))
    rig.start_flows()
    verdict = rig.apply(rig.faults()["kill-ztunnel-node1"])
    rig.stop_flows()
    leaks = rig.fd_leaks() + rig.teardown()

Every fault uses the lifecycle the mode already has: a proxy is SIGKILLed (its whole
process group, as the kernel would end a crashed container) and restarted with
`restart_proxy` (the same command, awaited until /healthz/ready), the CNI agent with
`InPodMode.restart_cni_agent` (it re-sends the node's pods to the reconnecting ztunnel),
pods leave and rejoin the mesh with `unenroll`/`enroll`, policies come and go with
`update_policies`, and a node's underlay link is taken down at its port on the fabric
bridge (a namespace of the testbed; the node keeps its routes, as a node whose cable was
pulled does).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from testbed.chaos.topology import WAYPOINT, ChaosTopology
from testbed.chaos.traffic import (
    HANG_SECONDS,
    BulkFlow,
    Flow,
    HttpFlow,
    Op,
    Sha256Sink,
    first_success,
)
from testbed.chaos.verdict import RECOVERY_SECONDS, FaultVerdict, judge, record_recovery
from testbed.cluster.cluster import Cluster
from testbed.netlab.manifest import RUNS_ROOT
from testbed.netlab.nsutil import netns_path
from testbed.netlab.process import ManagedProcess, signal_group
from testbed.netlab.reap import opened_netns, pids_in
from testbed.redirect import create_mode
from testbed.redirect.base import NodeZtunnelMode

HOLD_SECONDS = 1.0  # a fault lasts this long before it is repaired
LINK_DOWN_SECONDS = 2.0
HTTP_INTERVAL = 0.05  # 20 requests/s per HTTP flow
FD_TOLERANCE = 12  # descriptors a proxy may hold above its baseline (pooled connections)
FD_SETTLE_SECONDS = 20.0  # how long idle proxies get to close what the flows left
POLICY = "chaos-deny-client1"

ALL_FLOWS = ("bulk-node1", "bulk-node2", "bulk-cross", "http-node2", "http-waypoint")


@runtime_checkable
class CniAgentMode(Protocol):
    """A mode with a CNI agent per node (inpod), known by what it has: only the registry
    imports a mode's module."""

    agent_processes: dict[str, ManagedProcess]

    def restart_cni_agent(self, node: str) -> None: ...


@dataclass
class Fault:
    name: str
    kind: str  # what the summary counts: kill-ztunnel, kill-waypoint, ...
    inject: Callable[[], None]
    repair: Callable[[], None]
    affected: frozenset[str]
    unaffected: frozenset[str]


def others(*affected: str, neither: tuple[str, ...] = ()) -> frozenset[str]:
    return frozenset(ALL_FLOWS) - set(affected) - set(neither)


def sigkill(process: ManagedProcess) -> None:
    """The process and its group, at once: no handler runs, nothing is closed politely."""
    signal_group(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


@dataclass
class Rig:
    cluster: Cluster
    mode: NodeZtunnelMode
    flows: dict[str, Flow] = field(default_factory=dict)
    sinks: list[Sha256Sink] = field(default_factory=list)
    baseline_fds: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, mode_name: str, *, name: str | None = None, root: Path = RUNS_ROOT) -> Rig:
        mode = create_mode(mode_name)
        if not isinstance(mode, NodeZtunnelMode):
            raise ValueError(f"mode {mode_name}: chaos needs a mode with a ztunnel per node")
        run = name or "chaos" + secrets.token_hex(3)
        cluster = Cluster(ChaosTopology(), mode, name=run, root=root).start()
        rig = cls(cluster, mode)
        try:
            rig._make_flows()
        except BaseException:
            rig.close()
            raise
        return rig

    def _make_flows(self) -> None:
        pod = self.cluster.pod
        self.sinks = [Sha256Sink(pod("server1")), Sha256Sink(pod("server2"))]
        port = self.sinks[0].port
        web = self.cluster.services["web"].vip
        self.flows = {
            "bulk-node1": BulkFlow("bulk-node1", pod("client1"), pod("server1").ip, port),
            "bulk-node2": BulkFlow("bulk-node2", pod("client2"), pod("server2").ip, port),
            "bulk-cross": BulkFlow("bulk-cross", pod("client1"), pod("server2").ip, port),
            "http-node2": HttpFlow(
                "http-node2", pod("client2"), pod("server2").ip, 80, HTTP_INTERVAL
            ),
            "http-waypoint": HttpFlow("http-waypoint", pod("client1"), web, 80, HTTP_INTERVAL),
        }

    # -- traffic --------------------------------------------------------------------------
    def warm_up(self, bound: float = 30.0) -> None:
        """One working operation per flow (the mesh is up end to end), then the proxies'
        idle descriptor counts: the baseline the leak check compares with."""
        for flow in self.flows.values():
            if first_success(flow, bound) is None:
                raise RuntimeError(f"chaos: flow {flow.name} does not work before any fault")
        time.sleep(1.0)
        self.baseline_fds = self.fd_counts()

    def start_flows(self) -> None:
        for flow in self.flows.values():
            flow.start()

    def stop_flows(self) -> None:
        for flow in self.flows.values():
            flow.stop()

    def ops(self) -> dict[str, list[Op]]:
        return {name: list(flow.ops) for name, flow in self.flows.items()}

    def wait_past(self, moment: float) -> None:
        """Until every running flow has started an operation after `moment`: then each
        operation that overlaps a fault before it has ended (a hang ends as one)."""
        deadline = time.monotonic() + HANG_SECONDS + 5
        for flow in self.flows.values():
            while flow.running and not any(op.started > moment for op in flow.ops[-3:]):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)

    # -- faults ---------------------------------------------------------------------------
    def faults(self) -> dict[str, Fault]:
        mode = self.mode
        faults = [
            Fault("kill-ztunnel-node1", "kill-ztunnel",
                  lambda: sigkill(mode.ztunnels["node1"].process),
                  lambda: mode.restart_ztunnel("node1"),
                  frozenset({"bulk-node1", "bulk-cross", "http-waypoint"}),
                  others("bulk-node1", "bulk-cross", "http-waypoint")),
            Fault("kill-ztunnel-node2", "kill-ztunnel",
                  lambda: sigkill(mode.ztunnels["node2"].process),
                  lambda: mode.restart_ztunnel("node2"),
                  frozenset({"bulk-node2", "bulk-cross", "http-node2", "http-waypoint"}),
                  frozenset({"bulk-node1"})),
            Fault("kill-waypoint", "kill-waypoint",
                  lambda: sigkill(mode.proxies[f"waypoint-{WAYPOINT}"].process),
                  lambda: mode.restart_proxy(f"waypoint-{WAYPOINT}"),
                  frozenset({"http-waypoint"}), others("http-waypoint")),
            Fault("unenroll-server1", "enrolment",
                  lambda: mode.unenroll(self.cluster.pod("server1")),
                  lambda: mode.enroll(self.cluster.pod("server1")),
                  frozenset({"bulk-node1"}), others("bulk-node1")),
            Fault("deny-client1-to-server2", "policy", self._deny, self._allow,
                  frozenset({"bulk-cross"}), others("bulk-cross", neither=("http-waypoint",))),
            Fault("link-down-node1", "link", lambda: self._link("node1", "down"),
                  lambda: self._link("node1", "up"),
                  frozenset({"bulk-cross", "http-waypoint"}),
                  others("bulk-cross", "http-waypoint")),
        ]  # fmt: skip
        if isinstance(mode, CniAgentMode):
            agents = mode
            faults.append(
                Fault("kill-cni-agent-node1", "kill-cni-agent",
                      lambda: sigkill(agents.agent_processes["node1"]),
                      lambda: agents.restart_cni_agent("node1"),
                      frozenset(), others())
            )  # fmt: skip
        return {fault.name: fault for fault in faults}

    def _deny(self) -> None:
        rules = [{"principals": ["cluster.local/ns/default/sa/client1"]}]
        self.cluster.topology.add_policy(
            POLICY, action="DENY", selector={"app": "server2"}, rules=rules
        )
        self.mode.update_policies()

    def _allow(self) -> None:
        self.cluster.topology.remove_policy(POLICY)
        self.mode.update_policies()

    def _link(self, node: str, state: str) -> None:
        """The node's port on the fabric bridge: its eth0 loses carrier, keeps its routes."""
        fabric = self.cluster.fabric
        assert fabric is not None
        port = f"vn{self.cluster.nodes[node].spec.index}"
        fabric.run(["ip", "link", "set", port, state])

    def apply(self, fault: Fault, hold: float | None = None) -> FaultVerdict:
        """Inject, hold, repair; new connections on the affected paths, then the verdict."""
        if hold is None:
            hold = LINK_DOWN_SECONDS if fault.kind == "link" else HOLD_SECONDS
        injected = time.monotonic()
        fault.inject()
        time.sleep(hold)
        fault.repair()
        repaired = time.monotonic()
        recovery = {
            name: first_success(self.flows[name], RECOVERY_SECONDS) for name in fault.affected
        }
        self.wait_past(repaired + 1.0)
        verdict = judge(
            fault.name, self.ops(), injected, repaired,
            affected=fault.affected, unaffected=fault.unaffected,
        )  # fmt: skip
        for name, seconds in sorted(recovery.items()):
            record_recovery(verdict, name, seconds)
        return verdict

    # -- leaks ----------------------------------------------------------------------------
    def fd_counts(self) -> dict[str, int]:
        """Open descriptors of every proxy (and inpod's CNI agents), by label."""
        pids = dict(self.mode.proxy_pids())
        if isinstance(self.mode, CniAgentMode):
            pids |= {f"cni-agent-{n}": p.pid for n, p in self.mode.agent_processes.items()}
        counts = {}
        for label, pid in pids.items():
            with contextlib.suppress(FileNotFoundError):
                counts[label] = len(os.listdir(f"/proc/{pid}/fd"))
        return counts

    def fd_leaks(self) -> list[str]:
        """Proxies above baseline + FD_TOLERANCE once idle (polled for FD_SETTLE_SECONDS)."""
        deadline = time.monotonic() + FD_SETTLE_SECONDS
        while True:
            leaks = fd_growth(self.baseline_fds, self.fd_counts(), FD_TOLERANCE)
            if not leaks or time.monotonic() > deadline:
                return leaks
            time.sleep(1.0)

    def teardown(self) -> list[str]:
        """Tear the cluster down; what is left of it afterwards (processes in its
        namespaces, namespaces, its manifest)."""
        lab = self.cluster.lab
        if lab is None:
            return ["the cluster was not running"]
        manifest = lab.manifest
        paths = [netns_path(e["name"]) for e in manifest.entries() if e.kind == "netns"]
        with opened_netns(paths) as owned:
            self.close()
            left = [f"process {pid} in {owned[ident]}" for pid, ident in pids_in(owned).items()]
        left += [f"namespace {path}" for path in paths if os.path.exists(path)]
        if manifest.dir.exists():
            left.append(f"manifest {manifest.path}")
        return left

    def close(self) -> None:
        self.stop_flows()
        for sink in self.sinks:
            sink.close()
        self.cluster.stop()

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fd_growth(baseline: dict[str, int], now: dict[str, int], tolerance: int) -> list[str]:
    """Each proxy whose descriptors grew beyond `tolerance` (a proxy gone is no leak)."""
    return [
        f"{label}: {now[label]} open descriptors, baseline {count} (+{tolerance} allowed)"
        for label, count in sorted(baseline.items())
        if label in now and now[label] > count + tolerance
    ]


@contextlib.contextmanager
def flowing(rig: Rig) -> Iterator[Rig]:
    rig.start_flows()
    try:
        yield rig
    finally:
        rig.stop_flows()
