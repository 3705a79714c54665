"""The ebpf datapath of one node (docs/architecture.md): programs, maps and ztunnel's routing.

`NodeDatapath.install` loads one copy of the programs for the node, fills the host and
ztunnel maps, attaches `ztunnel_host_ingress` to ztunnel's host-side veth and
`ztunnel_tproxy` to eth0 inside ztunnel's namespace, and gives that namespace the routing
that delivers bpf_sk_assign'ed packets locally, the DNAT that takes the pods' captured DNS
(UDP 53, which the programs send to ztunnel's veth but do not sk-assign, as Istio's did not)
to ztunnel's DNS proxy on 15053, and forwarding for the pods' other UDP only.
`enroll`/`unenroll` add and remove one pod: its map entry and the two programs on its
host-side veth. `detach_ztunnel`/`attach_ztunnel` empty and
refill the ztunnel map, as Istio's CNI does when its ztunnel goes away and comes back: in
between, the enrolled pods' traffic is dropped. Nothing is configured outside the node's and
ztunnel's namespaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from testbed.netlab import Lab, Netns, links
from testbed.redirect import bpfload
from testbed.redirect.bpfmaps import DETACHED, PodEntry, ZtunnelEntry
from testbed.redirect.tcx import Direction

TPROXY_MARK = "0x400/0xfff"  # set by ztunnel_tproxy: route to the local table
LOCAL_TABLE = "100"
TPROXY_RULE_PRIORITY = "20000"
POD_DEV = "eth0"
DNS_PROXY_PORT = 15053
DIRECTIONS: tuple[Direction, Direction] = ("ingress", "egress")


def link_facts(ns: Netns, ifname: str) -> tuple[int, str]:
    """(ifindex, MAC) of an interface in `ns`."""
    with ns.iproute() as ipr:
        index = links.ifindex(ipr, ifname)
        mac = ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")
    return index, str(mac)


def ztunnel_routing_argvs() -> list[list[str]]:
    """ip commands (after `ip`) that make ztunnel's namespace deliver marked packets."""
    return [
        ["rule", "add", "priority", TPROXY_RULE_PRIORITY, "fwmark", TPROXY_MARK,
         "lookup", LOCAL_TABLE],
        ["route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", LOCAL_TABLE],
    ]  # fmt: skip


def ztunnel_dns_argv(ztunnel_ip: str) -> list[str]:
    """The iptables rule (after `iptables`) in ztunnel's namespace that hands a captured DNS
    query to the DNS proxy; conntrack gives the answer the address the pod asked."""
    return [
        "-t", "nat", "-A", "PREROUTING", "-i", POD_DEV, "-p", "udp", "--dport", "53",
        "-j", "DNAT", "--to-destination", f"{ztunnel_ip}:{DNS_PROXY_PORT}",
    ]  # fmt: skip


def ztunnel_forward_argvs() -> list[list[str]]:
    """iptables rules in ztunnel's namespace: the pods' other UDP, which the programs steer
    there and ztunnel has no listener for, is routed on (the namespace forwards it, as a
    Kubernetes node's pods do); TCP no ztunnel socket took is dropped, never routed around
    ztunnel."""
    return [
        ["-t", "filter", "-A", "FORWARD", "-i", POD_DEV, "-p", "udp", "-j", "ACCEPT"],
        ["-t", "filter", "-A", "FORWARD", "-j", "DROP"],
    ]


ZTUNNEL_SYSCTLS = {
    # ztunnel's hairpinned HBONE to a pod of its own node arrives from its own address
    f"net.ipv4.conf.{POD_DEV}.accept_local": 1,
    "net.ipv4.ip_forward": 1,  # the pods' UDP (ztunnel_forward_argvs)
}


def node_sysctls(ztunnel_host_dev: str) -> dict[str, int]:
    """ztunnel sends with pods' addresses (spoofed source) from its own veth."""
    return {
        "net.ipv4.conf.all.rp_filter": 0,
        f"net.ipv4.conf.{ztunnel_host_dev}.rp_filter": 0,
    }


Hook = Literal["tc", "tcx"]


@dataclass
class NodeDatapath:
    lab: Lab
    node: Netns
    ztunnel: Netns
    ztunnel_host_dev: str
    loaded: bpfload.LoadedObject
    hook: Hook
    entry: ZtunnelEntry  # what the ztunnel map holds while ztunnel is attached

    @classmethod
    def install(
        cls,
        lab: Lab,
        bpffs: Path,
        name: str,
        *,
        node: Netns,
        ztunnel: Netns,
        ztunnel_host_dev: str,
        ztunnel_ip: str,
        host_ip: str,
        hook: Hook = "tc",
        obj: Path = bpfload.OBJECT,
    ) -> NodeDatapath:
        """Load, fill the node's maps, route ztunnel's namespace, then attach."""
        loaded = bpfload.load_object(lab, bpffs, name, obj)
        ifindex, _ = link_facts(node, ztunnel_host_dev)
        _, mac = link_facts(ztunnel, POD_DEV)
        entry = ZtunnelEntry(ifindex, ztunnel_ip, mac, capture_dns=True)
        datapath = cls(lab, node, ztunnel, ztunnel_host_dev, loaded, hook, entry)
        if hook == "tcx":
            lab.add_dir(loaded.dir / "links")
        loaded.maps.set_host(host_ip)
        datapath.attach_ztunnel()
        datapath._route_ztunnel()
        datapath._attach(ztunnel, POD_DEV, "ingress", "ztunnel_tproxy")
        datapath._attach(node, ztunnel_host_dev, "ingress", "ztunnel_host_ingress")
        return datapath

    def attach_ztunnel(self) -> None:
        self.loaded.maps.set_ztunnel(self.entry)

    def detach_ztunnel(self) -> None:
        """No ztunnel for the node's pods: the app programs drop their traffic."""
        self.loaded.maps.set_ztunnel(DETACHED)

    def _route_ztunnel(self) -> None:
        for argv in ztunnel_routing_argvs():
            self.ztunnel.run(["ip", *argv])
        for argv in [ztunnel_dns_argv(self.entry.ip), *ztunnel_forward_argvs()]:
            self.ztunnel.run(["iptables", "-w", *argv])
        for key, value in ZTUNNEL_SYSCTLS.items():
            self.ztunnel.set_sysctl(key, value)
        for key, value in node_sysctls(self.ztunnel_host_dev).items():
            self.node.set_sysctl(key, value)

    def _link_pin(self, ns: Netns, dev: str, direction: Direction) -> Path | None:
        """Where a tcx link is pinned (None for tc filters, which need no pin)."""
        if self.hook != "tcx":
            return None
        role = "ztunnel" if ns is self.ztunnel else "node"
        return self.loaded.dir / "links" / f"{role}-{dev}-{direction}"

    def _attach(self, ns: Netns, dev: str, direction: Direction, program: str) -> None:
        link_pin = self._link_pin(ns, dev, direction)
        if link_pin is not None:
            self.lab.manifest.record("bpf_pin", path=str(link_pin))
        bpfload.attach(ns, dev, direction, self.loaded.program(program), link_pin=link_pin)

    def enroll(self, pod_ip: str, pod: Netns, host_dev: str) -> None:
        ifindex, _ = link_facts(self.node, host_dev)
        _, mac = link_facts(pod, POD_DEV)
        self.loaded.maps.put_pod(PodEntry(pod_ip, ifindex, mac))
        self._attach(self.node, host_dev, "ingress", "app_outbound")
        self._attach(self.node, host_dev, "egress", "app_inbound")

    def unenroll(self, pod_ip: str, host_dev: str) -> None:
        for direction in DIRECTIONS:
            link_pin = self._link_pin(self.node, host_dev, direction)
            bpfload.detach(self.node, host_dev, direction, link_pin=link_pin)
        self.loaded.maps.remove_pod(pod_ip)

    def enrolled(self) -> list[PodEntry]:
        return self.loaded.maps.pods()
