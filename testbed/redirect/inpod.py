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

Options (InPodOptions): `inpod_variant` redirect (default) | tproxy | nftables;
`trust_domain` (default cluster.local).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from testbed.mesh import zds
from testbed.netlab import ManagedProcess
from testbed.redirect import inpod_rules
from testbed.redirect.agent_process import AgentClient
from testbed.redirect.base import MeshOptions, NodeZtunnelMode

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod

# variant option -> (iptables variant, backend)
VARIANTS: dict[str, tuple[inpod_rules.Variant, inpod_rules.Backend]] = {
    "redirect": ("redirect", "iptables"),
    "tproxy": ("tproxy", "iptables"),
    "nftables": ("redirect", "nftables"),
}


class InPodOptions(MeshOptions):
    inpod_variant: Literal["redirect", "tproxy", "nftables"] = "redirect"


class InPodMode(NodeZtunnelMode):
    name = "inpod"
    captures_dns = True
    Options = InPodOptions
    options: InPodOptions
    variant_option = "inpod_variant"
    ZTUNNEL_MODULE = "testbed.mesh.ztunnel"

    def __init__(self, options: InPodOptions | None = None) -> None:
        super().__init__(options)
        self.rules_variant, self.backend = VARIANTS[self.options.inpod_variant]
        self.agents: dict[str, AgentClient] = {}  # by node
        self.agent_processes: dict[str, ManagedProcess] = {}
        self.zds_sockets: dict[str, Path] = {}

    # -- install ------------------------------------------------------------------------
    def install_node(self, cluster: Cluster, node: str, ztunnel: Pod) -> None:
        """The node's CNI agent, serving ZDS on a socket the ztunnel connects to."""
        zds_socket = self.lab.add_socket(self.mesh.directory / f"zds-{node}.sock")
        control_socket = self.lab.add_socket(self.mesh.directory / f"cni-{node}.sock")
        self.agent_processes[node] = cluster.nodes[node].netns.spawn(
            [sys.executable, "-m", "testbed.redirect.agent_process",
             "--zds-socket", str(zds_socket), "--control-socket", str(control_socket)],
            label=f"cni-agent-{node}",
        )  # fmt: skip
        self.agents[node] = AgentClient(control_socket)
        self.zds_sockets[node] = zds_socket

    def ztunnel_args(self, node: str, ztunnel: Pod) -> list[str]:
        """The inpod ztunnel is handed its pods' namespaces over ZDS."""
        return ["--zds-socket", str(self.zds_sockets[node])]

    def ztunnel_companions(self, node: str) -> list[ManagedProcess]:
        return [self.agent_processes[node]]

    def start_proxies(self, cluster: Cluster) -> None:
        super().start_proxies(cluster)
        for agent in self.agents.values():
            agent.wait_listening()

    # -- pods -----------------------------------------------------------------------------
    def capture(self, pod: Pod) -> None:
        """The in-pod rules, then the pod's netns handed to its node's ztunnel."""
        inpod_rules.install(pod.netns, self.rules_variant, self.backend)
        info = zds.WorkloadInfo(pod.name, pod.namespace, pod.service_account)
        self.agents[pod.node].enroll(pod.spec.uid, info, pod.netns.path)

    def release(self, pod: Pod) -> None:
        """Istio's order (RemovePodFromMesh): the pod's rules go first, then ztunnel gets
        Del, so no packet is redirected to listeners that are closing."""
        inpod_rules.uninstall(pod.netns)
        self.agents[pod.node].unenroll(pod.spec.uid)

    def describe_capture(self, pod: Pod) -> str:
        if self.backend == "nftables":
            return pod.run(["nft", "list", "ruleset"]).stdout
        return pod.run(["iptables-save"]).stdout
