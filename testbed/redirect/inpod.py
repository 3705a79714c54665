"""Mode `inpod`: Istio ambient's current redirection (DESIGN.md 4.1).

Per node: a ztunnel process in its own pod namespace (istio-system/ztunnel) and a CNI agent
process (testbed.redirect.agent_process, in the node's namespace) serving ZDS on a unix
socket; both are processes of the run, so they outlive the command that built the cluster.
Enrolling a pod installs the in-pod capture rules (iptables REDIRECT or TPROXY variant, or
nftables) in its namespace and hands the namespace to the node's ztunnel, which opens
15001/15006/15008 inside it. Pods labelled `istio.io/dataplane-mode: none` stay out of the
mesh.

The control plane (testbed.redirect.control) writes the mesh config and per-node
certificates under `<run dir>/mesh/`; `update_policies()` rewrites the config after the
topology's policies changed and returns once every ztunnel has loaded it.

Options: `inpod_variant` redirect (default) | tproxy | nftables; `trust_domain`
(default cluster.local).
"""

from __future__ import annotations

import json
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.cluster.waypoints import WaypointProcesses
from testbed.mesh import zds
from testbed.mesh.ca import DEFAULT_TRUST_DOMAIN
from testbed.mesh.waypoint import READY_PORT as WAYPOINT_READY_PORT
from testbed.mesh.ztunnel import ADMIN_PORT, READY_PORT
from testbed.mesh.ztunnel.state import config_digest
from testbed.netlab import Lab, ManagedProcess
from testbed.redirect import inpod_rules
from testbed.redirect.agent_process import AgentClient
from testbed.redirect.control import ControlPlane, is_captured

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod
    from testbed.cluster.model import Topology

# variant option -> (iptables variant, backend)
VARIANTS: dict[str, tuple[inpod_rules.Variant, inpod_rules.Backend]] = {
    "redirect": ("redirect", "iptables"),
    "tproxy": ("tproxy", "iptables"),
    "nftables": ("redirect", "nftables"),
}
OPTIONS = ("inpod_variant", "trust_domain")
ZTUNNEL_NAMESPACE = "istio-system"
ZTUNNEL_ACCOUNT = "ztunnel"
START_TIMEOUT = 15.0
POLL_INTERVAL = 0.05


class InPodError(RuntimeError):
    """A ztunnel did not come up, or did not take a change, in time."""


def http_get(pod: Pod, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET http://127.0.0.1:<port><path> inside `pod`'s namespace: (status, body)."""
    with pod.netns.entered():
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _lab_of(cluster: Cluster) -> Lab:
    if cluster.lab is None:
        raise InPodError("mode inpod installs into a started cluster")
    return cluster.lab


@dataclass
class NodeMesh:
    """What the mode runs for one node."""

    node: str
    pod: Pod  # the ztunnel pod
    agent: AgentClient
    agent_process: ManagedProcess
    certs: Path
    argv: list[str]
    process: ManagedProcess | None = None


class InPodMode:
    name = "inpod"

    def __init__(self, variant: str = "redirect", trust_domain: str = DEFAULT_TRUST_DOMAIN):
        self.variant = variant
        self.rules_variant, self.backend = VARIANTS[variant]
        self.trust_domain = trust_domain
        self.nodes: dict[str, NodeMesh] = {}
        self.control: ControlPlane | None = None
        self.unenrolled: set[str] = set()  # captured by their labels, taken out since
        self.waypoints: WaypointProcesses | None = None
        self._cluster: Cluster | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> InPodMode:
        from testbed.redirect import ModeError

        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ModeError(f"mode inpod: unknown option(s) {unknown}; expected some of {OPTIONS}")
        variant = str(options.get("inpod_variant", "redirect"))
        if variant not in VARIANTS:
            raise ModeError(
                f"mode inpod: inpod_variant {variant!r}: expected one of {list(VARIANTS)}"
            )
        return cls(variant, str(options.get("trust_domain", DEFAULT_TRUST_DOMAIN)))

    # -- install ------------------------------------------------------------------------
    def install(self, cluster: Cluster) -> None:
        self._cluster = cluster
        lab = _lab_of(cluster)
        folder = lab.add_dir(cluster.workdir / "mesh")
        self.control = ControlPlane(folder, self.trust_domain)
        lab.add_file(self.control.config_path)
        config = self.control.write_config(cluster.topology)
        for node in cluster.nodes:
            self.nodes[node] = self._start_node(cluster, node, folder)
        for mesh in self.nodes.values():
            mesh.agent.wait_listening()
            self._await_ready(mesh)
        self.waypoints = WaypointProcesses(
            cluster, self.control.config_path, self.control.ca, folder
        )
        self.waypoints.start_all(config, self.waypoint_ready)
        for pod in cluster.pods.values():
            if is_captured(pod.spec):
                self.enroll(pod)

    def _start_node(self, cluster: Cluster, node: str, folder: Path) -> NodeMesh:
        assert self.control is not None
        lab = _lab_of(cluster)
        pod = cluster.add_system_pod(
            node, f"ztunnel-{node}", namespace=ZTUNNEL_NAMESPACE, service_account=ZTUNNEL_ACCOUNT
        )
        certs = lab.add_dir(folder / f"ztunnel-{node}")
        self.control.issue_node_certs(cluster.topology, node, certs)
        zds_socket = lab.add_socket(folder / f"zds-{node}.sock")
        control_socket = lab.add_socket(folder / f"cni-{node}.sock")
        agent = cluster.nodes[node].netns.spawn(
            [sys.executable, "-m", "testbed.redirect.agent_process",
             "--zds-socket", str(zds_socket), "--control-socket", str(control_socket)],
            label=f"cni-agent-{node}",
        )  # fmt: skip
        argv = [
            sys.executable, "-m", "testbed.mesh.ztunnel",
            "--config", str(self.control.config_path),
            "--certs", str(certs),
            "--zds-socket", str(zds_socket),
            "--node", node,
        ]  # fmt: skip
        mesh = NodeMesh(node, pod, AgentClient(control_socket), agent, certs, argv)
        mesh.process = pod.spawn(argv, label="ztunnel")
        return mesh

    def _await_ready(self, mesh: NodeMesh, timeout: float = START_TIMEOUT) -> None:
        """Until the ztunnel answers /healthz/ready with 200 (it has processed a snapshot)."""
        deadline = time.monotonic() + timeout
        while True:
            for label, proc in (("ztunnel", mesh.process), ("cni agent", mesh.agent_process)):
                if proc is not None and proc.poll() is not None:
                    raise InPodError(f"{label} on {mesh.node} exited: {proc.output()[-2000:]}")
            try:
                if http_get(mesh.pod, READY_PORT, "/healthz/ready")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise InPodError(f"ztunnel on {mesh.node} not ready after {timeout} s")
            time.sleep(POLL_INTERVAL)

    @staticmethod
    def waypoint_ready(pod: Pod) -> bool:
        try:
            return http_get(pod, WAYPOINT_READY_PORT, "/healthz/ready")[0] == 200
        except OSError:
            return False

    # -- pods -----------------------------------------------------------------------------
    def enroll(self, pod: Pod) -> None:
        """Capture the pod and hand it to its node's ztunnel; a pod that was unenrolled
        before is announced as in the mesh again once ztunnel serves it."""
        if not is_captured(pod.spec):
            return
        inpod_rules.install(pod.netns, self.rules_variant, self.backend)
        info = zds.WorkloadInfo(pod.name, pod.namespace, pod.service_account)
        self.nodes[pod.node].agent.enroll(pod.spec.uid, info, pod.netns.path)
        if pod.name in self.unenrolled:
            self.unenrolled.discard(pod.name)
            self.push_config()

    def unenroll(self, pod: Pod) -> None:
        """Out of the mesh first (peers stop sending it HBONE), then out of ztunnel."""
        if not is_captured(pod.spec) or pod.name in self.unenrolled:
            return
        self.unenrolled.add(pod.name)
        self.push_config()
        self.nodes[pod.node].agent.unenroll(pod.spec.uid)
        inpod_rules.uninstall(pod.netns)

    # -- ztunnel lifecycle and config --------------------------------------------------------
    def restart_ztunnel(self, node: str) -> None:
        """Kill the node's ztunnel and start a new one; returns once it has re-enrolled the
        pods from the agent's snapshot."""
        mesh = self.nodes[node]
        if mesh.process is not None:
            mesh.process.terminate()
        mesh.process = mesh.pod.spawn(mesh.argv, label="ztunnel")
        self._await_ready(mesh)

    def config_dump(self, node: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            http_get(self.nodes[node].pod, ADMIN_PORT, "/config_dump")[1]
        )
        return data

    def update_policies(self, topology: Topology | None = None) -> None:
        """Push the topology's current policies (after `add_policy`/`remove_policy`); returns
        once every ztunnel runs with them."""
        self.push_config(topology)

    def push_config(self, topology: Topology | None = None, timeout: float = 10.0) -> None:
        """Write the mesh config; returns once every ztunnel has loaded it."""
        assert self.control is not None and self._cluster is not None
        config = self.control.write_config(topology or self._cluster.topology, self.unenrolled)
        digest = config_digest(config)
        if self.waypoints is not None:
            self.waypoints.write_l7(config)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while self.config_dump(node)["configDigest"] != digest:
                if time.monotonic() > deadline:
                    raise InPodError(f"ztunnel on {node} did not load the new config")
                time.sleep(POLL_INTERVAL)

    # -- facts --------------------------------------------------------------------------------
    def facts(self) -> dict[str, str]:
        return {"inpod_variant": self.variant, "trust_domain": self.trust_domain}

    def proxy_pids(self) -> dict[str, int]:
        pids = {
            f"ztunnel-{node}": mesh.process.pid
            for node, mesh in self.nodes.items()
            if mesh.process is not None and mesh.process.poll() is None
        }
        return pids | (self.waypoints.proxy_pids() if self.waypoints else {})

    def describe_pod(self, pod: Pod) -> str:
        if not is_captured(pod.spec):
            return f"{pod.name}: not captured (istio.io/dataplane-mode=none)"
        if pod.name in self.unenrolled:
            return f"{pod.name}: not captured (unenrolled)"
        if self.backend == "nftables":
            return pod.run(["nft", "list", "ruleset"]).stdout
        return pod.run(["iptables-save"]).stdout
