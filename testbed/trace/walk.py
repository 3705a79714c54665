"""The walk: hops in path order, built from the diffed snapshots (pure, no I/O).

Order: namespaces in the order the connection meets them (client pod, its node, the
node's ztunnel pod, the fabric, waypoints, the server's node and ztunnel pod, the server
pod); inside one namespace, what happened before its proxy accepted the connection (rules
in hook order, the connection's conntrack entry), the proxy, then the proxy's own onward
connection and the links it left by. Counter evidence carries no timestamps, so order
inside one namespace is the hook order, not a measured one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from testbed.trace import conntrack, links, netfilter, proxies

PROXY_PORTS = frozenset({15001, 15006, 15008})
HBONE_PORT = 15008
# a rule matching the proxies' own socket mark handles the proxy's onward connection
_PROXY_MARK = re.compile(r"(?<!! )--mark 0x539|== 0x00000539")
COUNTER_NOTE = "counter delta (per rule: counts any simultaneous traffic too)"
LINK_NOTE = "interface counter delta (per device: counts any simultaneous traffic too)"


@dataclass
class Hop:
    kind: str  # netfilter | conntrack | route | link | ebpf | proxy | app | result
    netns: str  # the place: pod or node name
    detail: str
    evidence: str
    data: dict[str, Any] = field(default_factory=dict)
    step: int = 0  # 1-based position in the walk

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Place:
    """A namespace the connection may cross, in path order."""

    name: str  # pod or node name ("fabric" for the underlay)
    netns: str
    role: str  # pod | node | fabric | proxy (a ztunnel or waypoint pod)
    node: str | None = None
    ip: str | None = None


@dataclass
class Diff:
    """What changed in one place while the connection ran."""

    hits: list[netfilter.RuleHit] = field(default_factory=list)
    missing: list[netfilter.RuleCount] = field(default_factory=list)
    entries: list[conntrack.Entry] = field(default_factory=list)
    links: list[links.LinkDelta] = field(default_factory=list)
    records: list[proxies.ProxyRecord] = field(default_factory=list)
    metrics: list[proxies.MetricDelta] = field(default_factory=list)
    routes: list[tuple[str, str]] = field(default_factory=list)  # (detail, evidence)
    programs: list[tuple[str, str]] = field(default_factory=list)  # (device hook, program)
    conntrack_source: str = ""
    reused: list[conntrack.Entry] = field(default_factory=list)  # existed before the trace
    unkeyed: list[conntrack.Entry] = field(default_factory=list)  # not tied by 5-tuple
    traced: dict[tuple[str, str, str, int, str], int] = field(default_factory=dict)


def _entry_ends_at_proxy(entry: conntrack.Entry, local_ips: set[str]) -> bool:
    """The conntrack entry is of a connection a proxy of this namespace accepted."""
    rsrc, rsport, _, _ = entry.reply
    _, _, dst, dport = entry.original
    redirected = rsport in PROXY_PORTS and rsrc in local_ips | {"127.0.0.1"}
    return redirected or (dport in PROXY_PORTS and dst in local_ips)


def _rule_after_proxy(hit: netfilter.RuleHit) -> bool:
    return bool(_PROXY_MARK.search(hit.rule.spec))


def _rule_hop(place: Place, hit: netfilter.RuleHit, traced: int = 0) -> Hop:
    rule = hit.rule
    table = rule.table if rule.backend == "iptables" else f"nft {rule.table}"
    hook = f"{rule.hook} " if rule.hook and rule.hook != rule.chain else ""
    plural = "s" if hit.packets != 1 else ""
    detail = f"{hook}{table} {rule.chain} {hit.target} ({hit.packets} packet{plural})"
    note = COUNTER_NOTE
    if traced:
        plural = "s" if traced != 1 else ""
        note = (
            f"nftrace: {traced} packet{plural} of this connection met the rule"
            f" (xtables-monitor --trace, per flow); {COUNTER_NOTE}"
        )
    return Hop(
        "netfilter",
        place.name,
        detail,
        note,
        {
            "backend": rule.backend,
            "table": rule.table,
            "chain": rule.chain,
            "rule": rule.spec,
            "hook": rule.hook,
            "packets": hit.packets,
            "bytes": hit.bytes,
            "traced_packets": traced,
        },
    )


def _entry_hop(place: Place, entry: conntrack.Entry, source: str, diff: Diff) -> Hop:
    nat = f"; {entry.nat}" if entry.nat else ""
    note = f"conntrack entry ({source}), matched by 5-tuple"
    if entry in diff.unkeyed:
        note = f"conntrack entry ({source}), HBONE to a proxy on the path (no per-flow key)"
    if entry in diff.reused:
        note += "; existed before the trace (a pooled HBONE connection, reused)"
    return Hop(
        "conntrack",
        place.name,
        entry.text() + nat,
        note,
        {
            "original": list(entry.original),
            "reply": list(entry.reply),
            "mark": entry.mark,
            "zone": entry.zone,
            "state": entry.state,
            "nat": entry.nat,
        },
    )


def _link_hop(place: Place, delta: links.LinkDelta) -> Hop:
    detail = f"{delta.label}: rx {delta.rx_packets} tx {delta.tx_packets} packets"
    return Hop(
        "link",
        place.name,
        detail,
        LINK_NOTE,
        {
            "device": delta.link.name,
            "kind": delta.link.kind,
            "vni": delta.link.vni,
            "rx_packets": delta.rx_packets,
            "tx_packets": delta.tx_packets,
            "rx_bytes": delta.rx_bytes,
            "tx_bytes": delta.tx_bytes,
        },
    )


def record_hop(place: Place, proxy_name: str, record: proxies.ProxyRecord) -> Hop:
    ids = ""
    if record.src_identity or record.dst_identity:
        ids = f", {record.src_identity or '?'} -> {record.dst_identity or '?'}"
    target = f", CONNECT {record.connect_target}" if record.connect_target else ""
    upstream = f", upstream {record.upstream}" if record.upstream else ""
    reason = f" ({record.reason})" if record.reason else ""
    detail = (
        f"{proxy_name} {record.direction} on {record.listener}: {record.peer} ->"
        f" {record.original_dst}{target}{upstream}, {record.path}{ids};"
        f" {record.verdict}{reason}, {record.bytes_received} B in / {record.bytes_sent} B out"
    )
    evidence = f"{proxy_name} GET /connections id {record.id}"
    return Hop(
        "proxy",
        place.name,
        detail,
        evidence,
        {"proxy": proxy_name, **proxies.record_summary(record)},
    )


def metric_hop(place: Place, proxy_name: str, deltas: Sequence[proxies.MetricDelta]) -> Hop:
    opened = [d for d in deltas if d.name.endswith(("opened_total", "requests_total"))]
    failed = [d for d in deltas if d.name.endswith("failed_total")]
    first = (opened or failed or list(deltas))[0]
    labels = first.labels
    reporter = labels.get("reporter", "?")
    direction = {"source": "outbound", "destination": "inbound", "waypoint": "inbound"}.get(
        reporter, reporter
    )
    security = labels.get("connection_security_policy", "unknown")
    verdict = "failed" if failed else "opened"
    if "response_code" in labels:  # a waypoint counts requests, not connections
        verdict = f"request answered {labels['response_code']}"
    detail = (
        f"{proxy_name} {direction}: {labels.get('source_workload', '?')} ->"
        f" {labels.get('destination_workload', labels.get('destination_service_name', '?'))},"
        f" {security}; {'' if 'request' in verdict else 'connection '}{verdict}"
    )
    evidence = (
        f"{proxy_name} /metrics delta (no /connections endpoint: per label set, not per"
        " connection; simultaneous traces between the same workloads are not told apart)"
    )
    return Hop(
        "proxy",
        place.name,
        detail,
        evidence,
        {
            "proxy": proxy_name,
            "direction": direction,
            "labels": labels,
            "mtls": security == "mutual_tls",
            "waypoint": reporter == "waypoint",
            "fallback": "metrics",
        },
    )


def place_hops(
    place: Place, diff: Diff, proxy_hops: Sequence[Hop], *, inbound: bool = False
) -> list[Hop]:
    """The hops of one place, in the order described in the module docstring; `inbound`:
    the place is the server's, where what its proxy sends on leaves by OUTPUT."""
    local = {place.ip} if place.ip else set()
    before_proxy = bool(proxy_hops)
    hops: list[Hop] = []
    hits = sorted(diff.hits, key=netfilter.hit_order)

    def late_rule(hit: netfilter.RuleHit) -> bool:
        sent_on = inbound and hit.rule.hook in ("OUTPUT", "POSTROUTING")
        return before_proxy and (sent_on or _rule_after_proxy(hit))

    early = [h for h in hits if not late_rule(h)]
    late = [h for h in hits if late_rule(h)]
    first_entries = [e for e in diff.entries if not before_proxy or _entry_ends_at_proxy(e, local)]
    other_entries = [e for e in diff.entries if e not in first_entries]
    hops += [_rule_hop(place, h, diff.traced.get(h.rule.key, 0)) for h in early]
    hops += [Hop("route", place.name, d, e) for d, e in diff.routes]
    hops += [
        Hop("ebpf", place.name, f"{where}: {prog}", _EBPF_NOTE, {"program": prog, "attach": where})
        for where, prog in diff.programs
    ]
    hops += [_entry_hop(place, e, diff.conntrack_source, diff) for e in first_entries]
    hops += list(proxy_hops)
    hops += [_rule_hop(place, h, diff.traced.get(h.rule.key, 0)) for h in late]
    hops += [_entry_hop(place, e, diff.conntrack_source, diff) for e in other_entries]
    hops += [_link_hop(place, d) for d in diff.links]
    for rule in diff.missing:
        hops.append(
            Hop(
                "netfilter",
                place.name,
                f"rule removed during the trace: {rule.table} {rule.chain} {rule.spec}",
                "rule present before, absent after",
                {"removed": True, "rule": rule.spec, "table": rule.table, "chain": rule.chain},
            )
        )
    return hops


_EBPF_NOTE = (
    "program attachment (bpftool net show) plus the device's counter delta; run counts are"
    " unavailable (kernel.bpf_stats_enabled is host-global and stays off)"
)


def number(hops: Iterable[Hop]) -> list[Hop]:
    numbered = list(hops)
    for index, hop in enumerate(numbered, start=1):
        hop.step = index
    return numbered


def text_walk(hops: Sequence[Hop], *, evidence: bool = False) -> str:
    lines = []
    for hop in hops:
        kind = "" if hop.kind == "netfilter" else f"{hop.kind} "
        lines.append(f"{hop.step}. {hop.netns}: {kind}{hop.detail}")
        if evidence:
            lines.append(f"     [{hop.evidence}]")
    return "\n".join(lines)
