"""Links, addresses and routes through rtnetlink (pyroute2), one namespace at a time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from testbed.netlab.netns import Netns
from testbed.netlab.process import NetlabError

RT_SCOPE_LINK = 253


def ifindex(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetlabError(f"no interface named {ifname}")
    return int(found[0])


@contextmanager
def netns_fd(ns: Netns) -> Iterator[int]:
    fd = os.open(ns.path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def add_veth(ipr: IPRoute, ifname: str, peer: Netns, peer_ifname: str) -> int:
    """Create a veth pair: `ifname` in ipr's namespace, `peer_ifname` inside `peer`."""
    with netns_fd(peer) as fd:
        try:
            ipr.link(
                "add", ifname=ifname, kind="veth", peer={"ifname": peer_ifname, "net_ns_fd": fd}
            )
        except NetlinkError as exc:
            raise NetlabError(f"veth {ifname} <-> {peer.name}/{peer_ifname}: {exc}") from exc
    return ifindex(ipr, ifname)


def add_bridge(ipr: IPRoute, ifname: str) -> int:
    ipr.link("add", ifname=ifname, kind="bridge")
    index = ifindex(ipr, ifname)
    ipr.link("set", index=index, state="up")
    return index


def add_vxlan(
    ipr: IPRoute, ifname: str, *, vni: int, remote: str, local: str, dev: str, port: int = 4789
) -> int:
    ipr.link(
        "add",
        ifname=ifname,
        kind="vxlan",
        vxlan_id=vni,
        vxlan_group=remote,
        vxlan_local=local,
        vxlan_link=ifindex(ipr, dev),
        vxlan_port=port,
    )
    return ifindex(ipr, ifname)


def add_geneve(ipr: IPRoute, ifname: str, *, vni: int, remote: str, port: int = 6081) -> int:
    ipr.link(
        "add", ifname=ifname, kind="geneve", geneve_id=vni, geneve_remote=remote, geneve_port=port
    )
    return ifindex(ipr, ifname)


def set_up(ipr: IPRoute, index: int, *, master: int | None = None) -> None:
    if master is not None:
        ipr.link("set", index=index, master=master)
    ipr.link("set", index=index, state="up")


def add_address(ipr: IPRoute, index: int, address: str, prefixlen: int) -> None:
    ipr.addr("add", index=index, address=address, prefixlen=prefixlen)


def add_route(
    ipr: IPRoute,
    dst: str,
    *,
    gateway: str | None = None,
    oif: int | None = None,
    link_scope: bool = False,
    table: int | None = None,
) -> None:
    spec: dict[str, object] = {"dst": dst}
    if gateway:
        spec["gateway"] = gateway
    if oif is not None:
        spec["oif"] = oif
    if link_scope:
        spec["scope"] = RT_SCOPE_LINK
    if table is not None:
        spec["table"] = table
    try:
        ipr.route("add", **spec)
    except NetlinkError as exc:
        raise NetlabError(f"route {spec}: {exc}") from exc


def loopback_up(ipr: IPRoute) -> None:
    ipr.link("set", index=ifindex(ipr, "lo"), state="up")
