"""Mode `legacy`: Istio ambient's node-level redirection of Istio 1.15-1.20 (docs/architecture.md).

Per node, a ztunnel pod (istio-system/ztunnel) joined to the node by two tunnels, `istioin`
(VNI 1000) and `istioout` (VNI 1001). The node's iptables mark TCP from enrolled pods (the
ipset `ztunnel-pods-ips`) and policy routing sends it through `istioout`; traffic to enrolled
pods goes through `istioin` (table 100). Inside the ztunnel pod TPROXY hands both to one
ztunnel process in the "shared netns" shape (testbed.mesh.ztunnel.shared): listeners in its
own namespace with IP_TRANSPARENT, the original destination read from the local address,
connections to apps made from the client pod's address.

Istio used geneve tunnels; where the kernel has no geneve (probed in the node's namespace,
never assumed) the same tunnels are VXLAN, and `facts()` says `tunnel=vxlan`.

Options (LegacyOptions): `tunnel` auto (default) | geneve | vxlan; `same_node_fast_path`
true (default: Istio 1.20's ztunnel served a destination of its own node in-process, no TLS)
| false (over HBONE to the ztunnel's own 15008, delivered by the ztunnel-netns rule 20002);
`trust_domain` (default cluster.local).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from testbed.cluster.mode import ModeError
from testbed.netlab import Netns, links
from testbed.redirect import legacy_rules as lr
from testbed.redirect.base import NodeZtunnelMode, SharedZtunnelOptions

if TYPE_CHECKING:
    from pyroute2 import IPRoute

    from testbed.cluster.cluster import Cluster, Pod

log = logging.getLogger(__name__)

_PROBE_LINK = "tbgeneveprobe"


class LegacyError(ModeError):
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
    """Everything of docs/architecture.md for one node, in Istio's order: node rules and ipset,
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
    netns: Netns  # the node's
    ztunnel: Netns  # its ztunnel pod's
    facts: lr.NodeFacts


class LegacyOptions(SharedZtunnelOptions):
    tunnel: Literal["auto", "geneve", "vxlan"] = "auto"


class LegacyMode(NodeZtunnelMode):
    name = "legacy"
    Options = LegacyOptions
    options: LegacyOptions

    def __init__(self, options: LegacyOptions | None = None) -> None:
        super().__init__(options)
        self.tunnel: lr.TunnelKind | None = None
        self.tunnel_reason = ""
        self.nodes: dict[str, NodeMesh] = {}

    # -- install ------------------------------------------------------------------------
    def prepare(self, cluster: Cluster) -> None:
        first = next(iter(cluster.nodes.values()))
        self.tunnel, self.tunnel_reason = choose_tunnel(first.netns, self.options.tunnel)

    def install_node(self, cluster: Cluster, node: str, ztunnel: Pod) -> None:
        assert self.tunnel is not None
        target = cluster.nodes[node]
        facts = lr.NodeFacts(
            target.underlay_ip,
            ztunnel.ip,
            ztunnel.spec.host_ifname,
            self.tunnel,
        )
        install_node_plumbing(target.netns, ztunnel.netns, facts)
        self.nodes[node] = NodeMesh(target.netns, ztunnel.netns, facts)

    # -- pods -----------------------------------------------------------------------------
    def capture(self, pod: Pod) -> None:
        """Into the ipset and table 100 of its node, and its ztunnel's rule 20002."""
        mesh = self.nodes[pod.node]
        lr.enroll(mesh.netns, mesh.ztunnel, pod.ip, mesh.facts.host_ip)

    def release(self, pod: Pod) -> None:
        mesh = self.nodes[pod.node]
        lr.unenroll(mesh.netns, mesh.ztunnel, pod.ip, mesh.facts.host_ip)

    # -- facts --------------------------------------------------------------------------------
    def found_facts(self) -> dict[str, str]:
        if self.tunnel is None:
            return {}
        return {"tunnel": self.tunnel, "tunnel_reason": self.tunnel_reason}

    def describe_capture(self, pod: Pod) -> str:
        mesh = self.nodes[pod.node]
        route = mesh.netns.run(["ip", "route", "show", "table", lr.INBOUND_TABLE, pod.ip]).stdout
        return (
            f"{pod.name}: in ipset {lr.IPSET} of {pod.node}, tunnel={mesh.facts.tunnel}\n"
            f"table {lr.INBOUND_TABLE}: {route.strip()}\n"
            + mesh.netns.run(["iptables-save", "-t", "mangle"]).stdout
        )
