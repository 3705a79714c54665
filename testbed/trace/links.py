"""Interface counters of a namespace (`ip -d -s -j link`), diffed: which links a connection
crossed, with tunnel kind and VNI. Counters are per device, not per flow."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    name: str
    kind: str  # veth, bridge, vxlan, geneve, ... ("" for plain devices such as lo)
    vni: int | None
    master: str | None
    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int


@dataclass(frozen=True)
class LinkDelta:
    link: Link
    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int

    @property
    def label(self) -> str:
        kind = self.link.kind or "device"
        vni = f" VNI {self.link.vni}" if self.link.vni is not None else ""
        bridge = f" (port of {self.link.master})" if self.link.master else ""
        return f"{kind} {self.link.name}{vni}{bridge}"


def parse_links(text: str) -> list[Link]:
    found = []
    for item in json.loads(text or "[]"):
        info = item.get("linkinfo", {})
        stats = item.get("stats64", {})
        rx, tx = stats.get("rx", {}), stats.get("tx", {})
        data = info.get("info_data", {}) if isinstance(info.get("info_data"), dict) else {}
        vni = data.get("id") if info.get("info_kind") in ("vxlan", "geneve") else None
        found.append(
            Link(
                item["ifname"],
                info.get("info_kind", ""),
                int(vni) if vni is not None else None,
                item.get("master"),
                int(rx.get("packets", 0)),
                int(tx.get("packets", 0)),
                int(rx.get("bytes", 0)),
                int(tx.get("bytes", 0)),
            )
        )
    return found


def link_deltas(before: Iterable[Link], after: Iterable[Link]) -> list[LinkDelta]:
    """Devices (not lo) whose packet counters grew."""
    old = {link.name: link for link in before}
    deltas = []
    for link in after:
        prior = old.get(link.name)
        if prior is None or link.name == "lo":
            continue
        delta = LinkDelta(
            link,
            link.rx_packets - prior.rx_packets,
            link.tx_packets - prior.tx_packets,
            link.rx_bytes - prior.rx_bytes,
            link.tx_bytes - prior.tx_bytes,
        )
        if delta.rx_packets > 0 or delta.tx_packets > 0:
            deltas.append(delta)
    return deltas
