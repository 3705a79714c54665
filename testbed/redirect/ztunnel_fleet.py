"""The ztunnels of a node-level mode (legacy, ebpf): one process per node in its own pod
(istio-system/ztunnel), serving the node's pods from its own namespace
(testbed.mesh.ztunnel.shared), plus the control plane that feeds them.

The fleet owns what does not depend on how traffic is steered: the mesh config and
certificates, starting each ztunnel and waiting for /healthz/ready, pushing a new config
and waiting until every ztunnel runs it, and which captured pods were taken out of the
mesh. A mode adds its plumbing between `add_ztunnel_pod` and `start`.

`NodeZtunnelMode` is the part of such a mode that does not depend on the steering either:
installing in that order, enrolling and unenrolling in the order that keeps other pods'
connections alive, config, pids. A mode subclasses it with its own plumbing.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from testbed.netlab import ManagedProcess
from testbed.redirect import proxy_control
from testbed.redirect.control import is_captured

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod
    from testbed.cluster.model import Topology

ZTUNNEL_NAMESPACE = "istio-system"
ZTUNNEL_ACCOUNT = "ztunnel"
ZTUNNEL_MODULE = "testbed.mesh.ztunnel.shared"


@dataclass
class NodeZtunnel:
    pod: Pod
    process: ManagedProcess

    def config_dump(self) -> dict[str, Any]:
        return proxy_control.config_dump(self.pod)


class ZtunnelFleet:
    def __init__(self, cluster: Cluster, trust_domain: str) -> None:
        self.cluster = cluster
        self.control, self.folder = proxy_control.start_control_plane(cluster, trust_domain)
        self.ztunnels: dict[str, NodeZtunnel] = {}
        self.unenrolled: set[str] = set()  # captured by their labels, taken out since

    def add_ztunnel_pod(self, node: str) -> Pod:
        return self.cluster.add_system_pod(
            node, f"ztunnel-{node}", namespace=ZTUNNEL_NAMESPACE, service_account=ZTUNNEL_ACCOUNT
        )

    def start(self, node: str, pod: Pod) -> NodeZtunnel:
        """Issue the node's certificates and start its ztunnel in `pod`."""
        certs = proxy_control.lab_of(self.cluster).add_dir(self.folder / f"ztunnel-{node}")
        self.control.issue_node_certs(self.cluster.topology, node, certs)
        argv = [
            sys.executable, "-m", ZTUNNEL_MODULE,
            "--config", str(self.control.config_path),
            "--certs", str(certs),
            "--node", node,
            "--ztunnel-ip", pod.ip,
        ]  # fmt: skip
        ztunnel = NodeZtunnel(pod, pod.spawn(argv, label="ztunnel"))
        self.ztunnels[node] = ztunnel
        return ztunnel

    def await_ready(self) -> None:
        for ztunnel in self.ztunnels.values():
            proxy_control.await_ready(ztunnel.pod, ztunnel.process)

    def push_config(self, topology: Topology | None = None) -> None:
        """Write the mesh config; returns once every ztunnel has loaded it."""
        proxy_control.push_config(
            self.control,
            topology or self.cluster.topology,
            self.unenrolled,
            [ztunnel.pod for ztunnel in self.ztunnels.values()],
        )

    def take_out(self, pod: str) -> None:
        """Announce a captured pod as out of the mesh (peers stop sending it HBONE)."""
        self.unenrolled.add(pod)
        self.push_config()

    def put_back(self, pod: str) -> None:
        if pod in self.unenrolled:
            self.unenrolled.discard(pod)
            self.push_config()

    def proxy_pids(self) -> dict[str, int]:
        return {
            f"ztunnel-{node}": ztunnel.process.pid
            for node, ztunnel in self.ztunnels.items()
            if ztunnel.process.poll() is None
        }


class NodeZtunnelMode(ABC):
    """A mode with a ztunnel per node; subclasses say how traffic gets to it."""

    name: str

    def __init__(self, trust_domain: str) -> None:
        self.trust_domain = trust_domain
        self.enrolled: set[str] = set()
        self._fleet: ZtunnelFleet | None = None

    @property
    def fleet(self) -> ZtunnelFleet:
        if self._fleet is None:
            raise RuntimeError(f"mode {self.name} is not installed")
        return self._fleet

    # -- what a mode adds -------------------------------------------------------------------
    @abstractmethod
    def prepare(self, cluster: Cluster) -> None:
        """Once, before any node: what every node's plumbing needs."""

    @abstractmethod
    def install_node(self, cluster: Cluster, node: str, ztunnel: Pod) -> None:
        """The node's plumbing, with its ztunnel pod created but its ztunnel not started."""

    @abstractmethod
    def capture(self, pod: Pod) -> None:
        """Steer a pod's traffic to its node's ztunnel."""

    @abstractmethod
    def release(self, pod: Pod) -> None:
        """Stop steering a pod's traffic."""

    @abstractmethod
    def describe_capture(self, pod: Pod) -> str:
        """What steers an enrolled pod's traffic, for the shell and inspect."""

    # -- install ------------------------------------------------------------------------
    def install(self, cluster: Cluster) -> None:
        self._fleet = ZtunnelFleet(cluster, self.trust_domain)
        self.prepare(cluster)
        for node in cluster.nodes:
            pod = self.fleet.add_ztunnel_pod(node)
            self.install_node(cluster, node, pod)
            self.fleet.start(node, pod)
        self.fleet.await_ready()
        for app in cluster.pods.values():
            self.enroll(app)

    # -- pods -----------------------------------------------------------------------------
    def enroll(self, pod: Pod) -> None:
        """Captured; announced in the mesh again if it was taken out before."""
        if not is_captured(pod.spec) or pod.name in self.enrolled:
            return
        self.capture(pod)
        self.enrolled.add(pod.name)
        self.fleet.put_back(pod.name)

    def unenroll(self, pod: Pod) -> None:
        """Out of the mesh first (peers stop sending it HBONE), then no longer captured."""
        if pod.name not in self.enrolled:
            return
        self.fleet.take_out(pod.name)
        self.release(pod)
        self.enrolled.discard(pod.name)

    # -- config -----------------------------------------------------------------------------
    def config_dump(self, node: str) -> dict[str, Any]:
        return self.fleet.ztunnels[node].config_dump()

    def update_policies(self, topology: Topology | None = None) -> None:
        """Push the topology's current policies; returns once every ztunnel runs with them."""
        self.fleet.push_config(topology)

    # -- facts --------------------------------------------------------------------------------
    def proxy_pids(self) -> dict[str, int]:
        return self.fleet.proxy_pids() if self._fleet else {}

    def describe_pod(self, pod: Pod) -> str:
        if not is_captured(pod.spec):
            return f"{pod.name}: not captured (istio.io/dataplane-mode=none)"
        if pod.name not in self.enrolled:
            return f"{pod.name}: not captured (unenrolled)"
        return self.describe_capture(pod)
