"""Mode `inpod`: Istio ambient's current redirection (docs/architecture.md).

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
`trust_domain` (default cluster.local); `ztunnel` PATH (Istio's ztunnel binary on every node)
or node1:PATH[,node2:PATH] (on those nodes; the others run ours): testbed.redirect.istio_ztunnel.
With it, the CA service (testbed.mesh.ca_service) runs once per testbed in the istiod pod
(istio-system) and a config push restarts Istio's ztunnels, which read their config at start.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import field_validator

from testbed.cluster.mode import ModeError
from testbed.mesh import zds
from testbed.mesh.ca_service import CaServicePlan
from testbed.netlab import ManagedProcess
from testbed.redirect import inpod_rules, istio_ztunnel
from testbed.redirect.agent_process import AgentClient, snapshot_entry
from testbed.redirect.base import ZTUNNEL_NAMESPACE, MeshOptions, NodeZtunnelMode, Proxy

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod
    from testbed.cluster.model import Topology

ISTIOD_POD = "istiod"

# variant option -> (iptables variant, backend)
VARIANTS: dict[str, tuple[inpod_rules.Variant, inpod_rules.Backend]] = {
    "redirect": ("redirect", "iptables"),
    "tproxy": ("tproxy", "iptables"),
    "nftables": ("redirect", "nftables"),
}


class InPodOptions(MeshOptions):
    inpod_variant: Literal["redirect", "tproxy", "nftables"] = "redirect"
    ztunnel: str | None = None  # Istio's ztunnel binary: PATH or node1:PATH[,node2:PATH]

    @field_validator("ztunnel")
    @classmethod
    def _executable(cls, value: str | None) -> str | None:
        if value is not None:
            istio_ztunnel.parse_ztunnel_option(value)
        return value

    def facts(self) -> dict[str, str]:
        return {key: value for key, value in super().facts().items() if value != "None"}


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
        self.istio_binaries: dict[str, Path] = {}  # nodes running Istio's ztunnel
        self.ca_plan: CaServicePlan | None = None
        self.ca_process: ManagedProcess | None = None

    # -- install ------------------------------------------------------------------------
    def prepare(self, cluster: Cluster) -> None:
        """With Istio's ztunnel on some node: the CA service it gets certificates from."""
        try:
            self.istio_binaries = istio_ztunnel.binaries_by_node(
                self.options.ztunnel, list(cluster.nodes)
            )
        except ValueError as e:
            raise ModeError(
                f"mode {self.name}: option ztunnel {self.options.ztunnel!r}: {e}"
            ) from None
        if self.istio_binaries:
            self._start_ca_service(cluster)

    def _start_ca_service(self, cluster: Cluster) -> None:
        """Once per testbed, in the istiod pod on the first node, on the underlay."""
        pod = cluster.add_system_pod(
            next(iter(cluster.nodes)),
            ISTIOD_POD,
            namespace=ZTUNNEL_NAMESPACE,
            service_account=ISTIOD_POD,
            labels={"app": ISTIOD_POD},
        )
        folder = self.lab.add_dir(self.mesh.directory / ISTIOD_POD)
        plan = CaServicePlan.prepare(
            folder, self.mesh.ca, self.mesh.config_path, list(cluster.nodes), pod.ip
        )
        self.ca_process = pod.spawn(plan.argv(), label="ca-service")
        plan.await_ready(pod.netns, self.ca_process)
        self.ca_plan = plan

    def _start_ztunnel(self, node: str, pod: Pod) -> Proxy:
        if node not in self.istio_binaries or self.ca_plan is None:
            return super()._start_ztunnel(node, pod)
        env = istio_ztunnel.ztunnel_env(
            node,
            config=self.mesh.config_path,
            zds_socket=self.zds_sockets[node],
            trust_domain=self.trust_domain,
            ca_env=self.ca_plan.ztunnel_env(node),
        )
        argv = [str(self.istio_binaries[node])]
        companions = [*self.ztunnel_companions(node)]
        if self.ca_process is not None:
            companions.append(self.ca_process)
        return self.start_proxy(
            f"ztunnel-{node}", pod, argv, kind="ztunnel", reads_mesh_config=False,
            companions=companions, env=env,
        )  # fmt: skip

    def push_config(self, topology: Topology | None = None) -> None:
        """Ours load the new config; Istio's read it only at start, so they restart."""
        super().push_config(topology)
        for node in self.istio_binaries:
            self.restart_ztunnel(node)

    def found_facts(self) -> dict[str, str]:
        if not self.istio_binaries:
            return {}
        return {"istio_ztunnel_nodes": ",".join(sorted(self.istio_binaries))}

    def install_node(self, cluster: Cluster, node: str, ztunnel: Pod) -> None:
        """The node's CNI agent, serving ZDS on a socket the ztunnel connects to."""
        self.zds_sockets[node] = self.lab.add_socket(self.mesh.directory / f"zds-{node}.sock")
        control_socket = self.lab.add_socket(self.mesh.directory / f"cni-{node}.sock")
        self.agents[node] = AgentClient(control_socket)
        self._spawn_agent(node)

    def _spawn_agent(self, node: str, *extra: str) -> None:
        self.agent_processes[node] = self.cluster.nodes[node].netns.spawn(
            [sys.executable, "-m", "testbed.redirect.agent_process",
             "--zds-socket", str(self.zds_sockets[node]),
             "--control-socket", self.agents[node].control_path, *extra],
            label=f"cni-agent-{node}",
        )  # fmt: skip

    def restart_cni_agent(self, node: str) -> None:
        """Stop the node's CNI agent (if a fault did not already) and start a new one that
        knows the node's enrolled pods before it serves ZDS, as Istio's agent does after a
        restart: the node's ztunnel reconnects, gets them in the snapshot and keeps them.
        Returns once the new agent takes requests."""
        old = self.agent_processes[node]
        old.terminate()
        with contextlib.suppress(FileNotFoundError):  # a killed agent leaves its socket
            os.unlink(self.agents[node].control_path)
        snapshot = self.lab.add_file(self.mesh.directory / f"cni-{node}-snapshot.json")
        pods = [self.cluster.pods[name] for name in sorted(self.enrolled)]
        entries = [
            snapshot_entry(pod.spec.uid, _workload_info(pod), pod.netns.path)
            for pod in pods
            if pod.node == node
        ]
        snapshot.write_text(json.dumps(entries))
        self._spawn_agent(node, "--snapshot", str(snapshot))
        ztunnel = self.ztunnels[node]
        ztunnel.companions = [self.agent_processes[node] if c is old else c
                              for c in ztunnel.companions]  # fmt: skip
        self.agents[node].wait_listening()

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
        self.agents[pod.node].enroll(pod.spec.uid, _workload_info(pod), pod.netns.path)

    def release(self, pod: Pod) -> None:
        """Istio's order (RemovePodFromMesh): the pod's rules go first, then ztunnel gets
        Del, so no packet is redirected to listeners that are closing."""
        inpod_rules.uninstall(pod.netns)
        self.agents[pod.node].unenroll(pod.spec.uid)

    def describe_capture(self, pod: Pod) -> str:
        if self.backend == "nftables":
            return pod.run(["nft", "list", "ruleset"]).stdout
        return pod.run(["iptables-save"]).stdout


def _workload_info(pod: Pod) -> zds.WorkloadInfo:
    return zds.WorkloadInfo(pod.name, pod.namespace, pod.service_account)
