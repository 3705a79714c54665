"""Reading a Mininet `Topo` as the underlay between nodes.

Switches become Linux bridges in the fabric namespace (named in order `br1`, `br2`, ...:
interface names are short), switch-switch links become veth pairs between bridges, hosts
become nodes plugged into their switch. Bridges do not run STP, so the switch graph must be
a tree; a loop is refused rather than left to flood.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testbed.cluster.model import Topology


def _link_params(info: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if info.get("bw") is not None:
        params["rate"] = f"{info['bw']}mbit"  # Mininet's bw is in Mbit/s
    if info.get("delay") is not None:
        params["delay"] = str(info["delay"])
    if info.get("loss") is not None:
        params["loss"] = float(info["loss"])
    return params


def underlay_from_topo(topology: Topology, topo: Any) -> list[str]:
    switches = list(topo.switches())
    hosts = set(topo.hosts())
    if not switches:
        raise topology.error("the Mininet topology has no switches")
    bridge_of = {sw: f"br{i}" for i, sw in enumerate(switches, start=1)}
    topology.bridges = list(bridge_of.values())
    host_links: dict[str, tuple[str, dict[str, Any]]] = {}
    for a, b, info in topo.links(withInfo=True):
        if a in bridge_of and b in bridge_of:
            topology.bridge_links.append((bridge_of[a], bridge_of[b]))
            continue
        host, switch = (a, b) if a in hosts else (b, a)
        if switch not in bridge_of:
            raise topology.error(f"Mininet link {a}-{b}: host-to-host links are not supported")
        if host in host_links:
            raise topology.error(f"Mininet host {host} has more than one link; a node has one eth0")
        host_links[host] = (switch, info)
    _check_tree(topology, list(bridge_of.values()))
    names = []
    for host in topo.hosts():
        if host not in host_links:
            raise topology.error(f"Mininet host {host} is not linked to any switch")
        switch, info = host_links[host]
        names.append(topology.add_node(host, bridge=bridge_of[switch], **_link_params(info)))
    return names


def _check_tree(topology: Topology, bridges: list[str]) -> None:
    parent = {b: b for b in bridges}

    def root(b: str) -> str:
        while parent[b] != b:
            b = parent[b]
        return b

    for a, b in topology.bridge_links:
        ra, rb = root(a), root(b)
        if ra == rb:
            raise topology.error(
                f"the Mininet switches form a loop ({a}-{b}); bridges here run no STP, "
                "so the switch graph must be a tree"
            )
        parent[ra] = rb
