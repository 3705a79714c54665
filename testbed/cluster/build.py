"""Turning a planned topology into namespaces, veths, addresses and routes.

Underlay: a `fabric` namespace holds bridge br0; each node's eth0 is a veth into it.
Pods: one veth per pod, ptp style like the CNI ptp plugin or Calico: the pod has a /32 and a
default route via the node's gateway address, which every host-side veth of that node
carries; the node routes each pod's /32 to its veth and each other node's pod CIDR via that
node's underlay address.
"""

from __future__ import annotations

from pathlib import Path

from testbed.cluster.model import NodeSpec, PodSpec
from testbed.mesh.dns import resolv_conf
from testbed.netlab import Lab, Netns, links
from testbed.netlab.shaping import shape_link

UNDERLAY_PREFIX = 16
NETNS_ETC = Path("/etc/netns")
"""`ip netns exec NAME` bind-mounts each file of /etc/netns/NAME over /etc for what it runs."""


def build_fabric(lab: Lab, bridges: list[str], bridge_links: list[tuple[str, str]]) -> Netns:
    fabric = lab.add_netns("fabric")
    with fabric.iproute() as ipr:
        links.loopback_up(ipr)
        for bridge in bridges:
            links.add_bridge(ipr, bridge)
        for i, (a, b) in enumerate(bridge_links, start=1):
            end_a = links.add_veth(ipr, f"bl{i}a", fabric, f"bl{i}b")
            links.set_up(ipr, end_a, master=links.ifindex(ipr, a))
            links.set_up(ipr, links.ifindex(ipr, f"bl{i}b"), master=links.ifindex(ipr, b))
    return fabric


def build_node(
    lab: Lab, node: NodeSpec, fabric: Netns, others: list[NodeSpec], netem_available: bool
) -> Netns:
    ns = lab.add_netns(node.name)
    with fabric.iproute() as fab:
        port = links.add_veth(fab, f"vn{node.index}", ns, "eth0")
        links.set_up(fab, port, master=links.ifindex(fab, node.bridge))
    with ns.iproute() as ipr:
        links.loopback_up(ipr)
        eth0 = links.ifindex(ipr, "eth0")
        links.add_address(ipr, eth0, node.underlay_ip, UNDERLAY_PREFIX)
        links.set_up(ipr, eth0)
        for other in others:
            links.add_route(ipr, other.pod_cidr, gateway=other.underlay_ip)
    ns.set_sysctl("net.ipv4.ip_forward", 1)
    if node.link.shaped:
        shape_link(
            ns,
            "eth0",
            rate=node.link.rate,
            delay=node.link.delay,
            loss=node.link.loss,
            netem_available=netem_available,
        )
    return ns


def build_pod(lab: Lab, node: NodeSpec, node_ns: Netns, pod: PodSpec, dns_vip: str) -> Netns:
    ns = lab.add_netns(node.name, pod.name)
    write_resolv_conf(lab, ns, resolv_conf(dns_vip, pod.namespace))
    with node_ns.iproute() as nipr:
        host = links.add_veth(nipr, pod.host_ifname, ns, "eth0")
        links.add_address(nipr, host, node.gateway_ip, 32)
        links.set_up(nipr, host)
        links.add_route(nipr, f"{pod.ip}/32", oif=host, link_scope=True)
    with ns.iproute() as ipr:
        links.loopback_up(ipr)
        eth0 = links.ifindex(ipr, "eth0")
        links.add_address(ipr, eth0, pod.ip, 32)
        links.set_up(ipr, eth0)
        links.add_route(ipr, f"{node.gateway_ip}/32", oif=eth0, link_scope=True)
        links.add_route(ipr, "0.0.0.0/0", gateway=node.gateway_ip, oif=eth0)
    return ns


def write_resolv_conf(lab: Lab, ns: Netns, text: str) -> Path:
    """The pod's own resolv.conf, which every command run in the pod sees (Pod.run)."""
    folder = lab.add_dir(NETNS_ETC / ns.name)
    path = lab.add_file(folder / "resolv.conf")
    path.write_text(text, encoding="ascii")
    return path
