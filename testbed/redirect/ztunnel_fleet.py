"""The ztunnels of a node-level mode (ebpf; legacy has the same needs): one process per
node in its own pod (istio-system/ztunnel), serving the node's pods from its own namespace
(testbed.mesh.ztunnel.shared), plus the control plane that feeds them.

The fleet owns what does not depend on how traffic is steered: the mesh config and
certificates, starting each ztunnel and waiting for /healthz/ready, pushing a new config
and waiting until every ztunnel runs it, and which captured pods were taken out of the
mesh. A mode adds its plumbing between `add_ztunnel_pod` and `start`.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from testbed.mesh.ztunnel import ADMIN_PORT, READY_PORT
from testbed.mesh.ztunnel.state import config_digest
from testbed.netlab import ManagedProcess
from testbed.redirect.control import ControlPlane
from testbed.redirect.inpod import http_get

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod
    from testbed.cluster.model import Topology

ZTUNNEL_NAMESPACE = "istio-system"
ZTUNNEL_ACCOUNT = "ztunnel"
ZTUNNEL_MODULE = "testbed.mesh.ztunnel.shared"
START_TIMEOUT = 15.0
POLL_INTERVAL = 0.05


class ZtunnelError(RuntimeError):
    """A ztunnel did not come up, or did not take a change, in time."""


def wait_for(check: Callable[[], bool], timeout: float, failure: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise ZtunnelError(failure)
        time.sleep(POLL_INTERVAL)


@dataclass
class NodeZtunnel:
    node: str
    pod: Pod
    argv: list[str]
    process: ManagedProcess | None = None

    def answers_ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise ZtunnelError(f"ztunnel on {self.node} exited: {self.process.output()[-2000:]}")
        try:
            return http_get(self.pod, READY_PORT, "/healthz/ready")[0] == 200
        except OSError:
            return False

    def config_dump(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(http_get(self.pod, ADMIN_PORT, "/config_dump")[1])
        return data

    def runs_config(self, digest: str) -> bool:
        return bool(self.config_dump()["configDigest"] == digest)


class ZtunnelFleet:
    def __init__(self, cluster: Cluster, trust_domain: str) -> None:
        self.cluster = cluster
        lab = cluster._lab
        self.folder = lab.add_dir(cluster.workdir / "mesh")
        self.control = ControlPlane(self.folder, trust_domain)
        lab.add_file(self.control.config_path)
        self.control.write_config(cluster.topology)
        self.ztunnels: dict[str, NodeZtunnel] = {}
        self.unenrolled: set[str] = set()  # captured by their labels, taken out since

    def add_ztunnel_pod(self, node: str) -> Pod:
        return self.cluster.add_system_pod(
            node, f"ztunnel-{node}", namespace=ZTUNNEL_NAMESPACE, service_account=ZTUNNEL_ACCOUNT
        )

    def start(self, node: str, pod: Pod) -> NodeZtunnel:
        """Issue the node's certificates and start its ztunnel in `pod`."""
        certs = self.cluster._lab.add_dir(self.folder / f"ztunnel-{node}")
        self.control.issue_node_certs(self.cluster.topology, node, certs)
        argv = [
            sys.executable, "-m", ZTUNNEL_MODULE,
            "--config", str(self.control.config_path),
            "--certs", str(certs),
            "--node", node,
            "--ztunnel-ip", pod.ip,
        ]  # fmt: skip
        ztunnel = NodeZtunnel(node, pod, argv)
        ztunnel.process = pod.spawn(argv, label="ztunnel")
        self.ztunnels[node] = ztunnel
        return ztunnel

    def await_ready(self, timeout: float = START_TIMEOUT) -> None:
        for ztunnel in self.ztunnels.values():
            failure = f"ztunnel on {ztunnel.node} not ready after {timeout} s"
            wait_for(ztunnel.answers_ready, timeout, failure)

    def push_config(self, topology: Topology | None = None, timeout: float = 10.0) -> None:
        """Write the mesh config; returns once every ztunnel has loaded it."""
        config = self.control.write_config(topology or self.cluster.topology, self.unenrolled)
        digest = config_digest(config)
        for ztunnel in self.ztunnels.values():
            failure = f"ztunnel on {ztunnel.node} did not load the new config"
            wait_for(functools.partial(ztunnel.runs_config, digest), timeout, failure)

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
            f"ztunnel-{node}": z.process.pid
            for node, z in self.ztunnels.items()
            if z.process is not None and z.process.poll() is None
        }
