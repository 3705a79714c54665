"""Mode `legacy`: Istio ambient's node-level redirection of Istio 1.15-1.20 (DESIGN.md 4.2).

Per node, a ztunnel pod (istio-system/ztunnel) joined to the node by two tunnels, `istioin`
(VNI 1000) and `istioout` (VNI 1001). The node's iptables mark TCP from enrolled pods (the
ipset `ztunnel-pods-ips`) and policy routing sends it through `istioout`; traffic to enrolled
pods goes through `istioin` (table 100). Inside the ztunnel pod TPROXY hands both to one
ztunnel process in the "shared netns" shape (testbed.mesh.ztunnel.shared): listeners in its
own namespace with IP_TRANSPARENT, the original destination read from the local address,
connections to apps made from the client pod's address.

Istio used geneve tunnels; where the kernel has no geneve (probed in the node's namespace,
never assumed) the same tunnels are VXLAN, and `facts()` says `tunnel=vxlan`.

Options: `tunnel` auto (default) | geneve | vxlan; `trust_domain` (default cluster.local).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute

from testbed.mesh.ca import DEFAULT_TRUST_DOMAIN
from testbed.netlab import ManagedProcess, Netns, links
from testbed.redirect import legacy_rules as lr
from testbed.redirect.control import ControlPlane, is_captured
from testbed.redirect.proxy_control import (
    await_ready,
    config_dump,
    lab_of,
    push_config,
    start_control_plane,
)

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod
    from testbed.cluster.model import Topology

log = logging.getLogger(__name__)

OPTIONS = ("tunnel", "trust_domain")
TUNNEL_CHOICES = ("auto", "geneve", "vxlan")
ZTUNNEL_NAMESPACE = "istio-system"
ZTUNNEL_ACCOUNT = "ztunnel"
_PROBE_LINK = "tbgeneveprobe"


class LegacyError(RuntimeError):
    """The tunnel kind asked for is missing from the kernel."""


# ---------------------------------------------------------------- tunnels


def probe_geneve(ns: Netns) -> tuple[bool, str]:
    """Whether a geneve link can be created in `ns` (created and deleted at once)."""
    try:
        with ns.iproute() as ipr:
            ipr.link(
                "add", ifname=_PROBE_LINK, kind="geneve", geneve_id=1, geneve_remote="192.0.2.1"
            )
            ipr.link("del", index=links.ifindex(ipr, _PROBE_LINK))
    except Exception as exc:  # netlink reports a missing kind in several ways
        reason = exc.args[-1] if exc.args else exc  # NetlinkError: (errno, text)
        return False, f"no geneve links in this kernel ({reason})"
    return True, "geneve links can be created"


def choose_tunnel(ns: Netns, wanted: str) -> tuple[lr.TunnelKind, str]:
    """The tunnel kind to use and why: geneve where possible, else VXLAN (never silently)."""
    if wanted == "vxlan":
        return "vxlan", "vxlan requested"
    ok, detail = probe_geneve(ns)
    if ok:
        return "geneve", detail
    if wanted == "geneve":
        raise LegacyError(f"tunnel=geneve requested but {detail}")
    log.warning("legacy mode: %s; using VXLAN with the same VNIs and addresses", detail)
    return "vxlan", detail


def add_tunnel(ipr: IPRoute, tunnel: lr.Tunnel, kind: lr.TunnelKind) -> int:
    port = lr.TUNNEL_PORTS[kind]
    if kind == "geneve":
        index = links.add_geneve(ipr, tunnel.name, vni=tunnel.vni, remote=tunnel.remote, port=port)
    else:
        index = links.add_vxlan(
            ipr,
            tunnel.name,
            vni=tunnel.vni,
            remote=tunnel.remote,
            local=tunnel.local,
            dev=tunnel.underlay_dev,
            port=port,
        )
    links.add_address(ipr, index, tunnel.address, lr.PREFIX)
    links.set_up(ipr, index)
    return index


def _set_sysctls(ns: Netns, values: dict[str, int]) -> None:
    for key, value in values.items():
        ns.set_sysctl(key, value)


def install_node_plumbing(node_ns: Netns, ztunnel_ns: Netns, facts: lr.NodeFacts) -> None:
    """Everything of DESIGN.md 4.2 for one node, in Istio's order: node rules and ipset,
    tunnels on both sides, sysctls, node routing, then TPROXY and routing in the ztunnel."""
    lr.install_node_rules(node_ns, facts)
    for ns, tunnels in ((node_ns, lr.node_tunnels(facts)), (ztunnel_ns, lr.ztunnel_tunnels(facts))):
        with ns.iproute() as ipr:
            for tunnel in tunnels:
                add_tunnel(ipr, tunnel, facts.tunnel)
    _set_sysctls(node_ns, lr.node_sysctls(facts))
    _set_sysctls(ztunnel_ns, lr.ztunnel_sysctls())
    lr.install_node_routing(node_ns, facts)
    lr.install_ztunnel_rules(ztunnel_ns, facts)


# ---------------------------------------------------------------- the mode


@dataclass
class NodeMesh:
    node: str
    netns: Netns  # the node's
    pod: Pod  # the ztunnel pod
    facts: lr.NodeFacts
    process: ManagedProcess


class LegacyMode:
    name = "legacy"

    def __init__(self, tunnel: str = "auto", trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        self.wanted_tunnel = tunnel
        self.tunnel: lr.TunnelKind | None = None
        self.tunnel_reason = ""
        self.trust_domain = trust_domain
        self.nodes: dict[str, NodeMesh] = {}
        self.control: ControlPlane | None = None
        self.enrolled: set[str] = set()
        self.unenrolled: set[str] = set()  # captured by their labels, taken out since
        self._cluster: Cluster | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> LegacyMode:
        from testbed.redirect import ModeError

        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ModeError(f"mode legacy: unknown option(s) {unknown}; expected some of {OPTIONS}")
        tunnel = str(options.get("tunnel", "auto"))
        if tunnel not in TUNNEL_CHOICES:
            raise ModeError(f"mode legacy: tunnel {tunnel!r}: expected one of {TUNNEL_CHOICES}")
        return cls(tunnel, str(options.get("trust_domain", DEFAULT_TRUST_DOMAIN)))

    # -- install ------------------------------------------------------------------------
    def install(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self.control, folder = start_control_plane(cluster, self.trust_domain)
        first = next(iter(cluster.nodes.values()))
        self.tunnel, self.tunnel_reason = choose_tunnel(first.netns, self.wanted_tunnel)
        for node in cluster.nodes:
            self.nodes[node] = self._start_node(cluster, node, folder)
        for mesh in self.nodes.values():
            await_ready(mesh.pod, mesh.process)
        for pod in cluster.pods.values():
            self.enroll(pod)

    def _start_node(self, cluster: Cluster, node: str, folder: Path) -> NodeMesh:
        assert self.control is not None and self.tunnel is not None
        pod = cluster.add_system_pod(
            node, f"ztunnel-{node}", namespace=ZTUNNEL_NAMESPACE, service_account=ZTUNNEL_ACCOUNT
        )
        target = cluster.nodes[node]
        facts = lr.NodeFacts(
            target.underlay_ip, pod.ip, pod.spec.host_ifname, self.tunnel, target.spec.pod_cidr
        )
        install_node_plumbing(target.netns, pod.netns, facts)
        certs = lab_of(cluster).add_dir(folder / f"ztunnel-{node}")
        self.control.issue_node_certs(cluster.topology, node, certs)
        argv = [
            sys.executable, "-m", "testbed.mesh.ztunnel.shared",
            "--config", str(self.control.config_path),
            "--certs", str(certs),
            "--node", node,
            "--ztunnel-ip", pod.ip,
        ]  # fmt: skip
        return NodeMesh(node, target.netns, pod, facts, pod.spawn(argv, label="ztunnel"))

    # -- pods -----------------------------------------------------------------------------
    def enroll(self, pod: Pod) -> None:
        """Into the ipset and table 100 of its node; announced in the mesh again if it was
        taken out before."""
        if not is_captured(pod.spec) or pod.name in self.enrolled:
            return
        mesh = self.nodes[pod.node]
        lr.enroll(mesh.netns, pod.ip, mesh.facts.host_ip)
        self.enrolled.add(pod.name)
        if pod.name in self.unenrolled:
            self.unenrolled.discard(pod.name)
            self.push_config()

    def unenroll(self, pod: Pod) -> None:
        """Out of the mesh first (peers stop sending it HBONE), then out of the node rules."""
        if pod.name not in self.enrolled:
            return
        self.unenrolled.add(pod.name)
        self.push_config()
        mesh = self.nodes[pod.node]
        lr.unenroll(mesh.netns, pod.ip, mesh.facts.host_ip)
        self.enrolled.discard(pod.name)

    # -- config -----------------------------------------------------------------------------
    def config_dump(self, node: str) -> dict[str, Any]:
        return config_dump(self.nodes[node].pod)

    def update_policies(self, topology: Topology | None = None) -> None:
        """Push the topology's current policies; returns once every ztunnel runs with them."""
        self.push_config(topology)

    def push_config(self, topology: Topology | None = None) -> None:
        assert self.control is not None and self._cluster is not None
        ztunnels = [mesh.pod for mesh in self.nodes.values()]
        push_config(self.control, topology or self._cluster.topology, self.unenrolled, ztunnels)

    # -- facts --------------------------------------------------------------------------------
    def facts(self) -> dict[str, str]:
        found = {"tunnel": self.tunnel or self.wanted_tunnel, "trust_domain": self.trust_domain}
        if self.tunnel_reason:
            found["tunnel_reason"] = self.tunnel_reason
        return found

    def proxy_pids(self) -> dict[str, int]:
        return {
            f"ztunnel-{node}": mesh.process.pid
            for node, mesh in self.nodes.items()
            if mesh.process.poll() is None
        }

    def describe_pod(self, pod: Pod) -> str:
        if not is_captured(pod.spec):
            return f"{pod.name}: not captured (istio.io/dataplane-mode=none)"
        if pod.name not in self.enrolled:
            return f"{pod.name}: not captured (unenrolled)"
        mesh = self.nodes[pod.node]
        route = mesh.netns.run(["ip", "route", "show", "table", lr.INBOUND_TABLE, pod.ip]).stdout
        return (
            f"{pod.name}: in ipset {lr.IPSET} of {pod.node}, tunnel={mesh.facts.tunnel}\n"
            f"table {lr.INBOUND_TABLE}: {route.strip()}\n"
            + mesh.netns.run(["iptables-save", "-t", "mangle"]).stdout
        )
