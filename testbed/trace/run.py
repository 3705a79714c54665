"""Orchestration of one trace: places, snapshots, the connection, the diff, the walk."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from testbed.netlab import Netns
from testbed.netlab.errors import TestbedError
from testbed.trace import (
    conntrack,
    expected,
    links,
    netfilter,
    nftrace,
    probe,
    proxies,
    routing,
)
from testbed.trace.features import tracing_usable
from testbed.trace.snapshot import Snapshot, take_all
from testbed.trace.walk import Diff, Hop, Place, metric_hop, number, place_hops, record_hop

SETTLE = 0.3  # proxies close their records and counters settle after the close
RECORDS_TIMEOUT = 3.0  # at most this long for the proxies' records of the trace to close


class TraceError(TestbedError):
    """A bad trace request: unknown pod, service or address, or a malformed DST:PORT."""


class HasInventory(Protocol):
    def inventory(self) -> dict[str, Any]: ...


@dataclass
class TraceResult:
    run: str
    mode: str
    source: str
    destination: str
    placement: str
    outcome: probe.Outcome
    hops: list[Hop]
    places: list[Place]
    seconds: float
    notes: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    variant: str = ""  # inpod's rule variant (redirect, tproxy, nftables)
    server_ip: str = ""  # the endpoint that answered (or the destination asked for)

    def text(self, *, evidence: bool = False) -> str:
        from testbed.trace.walk import text_walk

        src, sport = self.outcome.source
        head = (
            f"trace {self.source} ({src}:{sport}) -> {self.destination}, mode {self.mode},"
            f" {self.placement}: "
            + ("connected" if self.outcome.ok else f"FAILED ({self.outcome.error})")
        )
        lines = [head, text_walk(self.hops, evidence=evidence)]
        lines += [f"note: {note}" for note in self.notes]
        if self.differences:
            lines.append(f"differs from the usual {self.mode} walk:")
            lines += [f"  - {d}" for d in self.differences]
        lines.append(f"({self.seconds:.2f} s)")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "mode": self.mode,
            "source": self.source,
            "destination": self.destination,
            "placement": self.placement,
            "connected": self.outcome.ok,
            "error": self.outcome.error,
            "client": f"{self.outcome.source[0]}:{self.outcome.source[1]}",
            "seen_by_app": self.outcome.seen_by_app,
            "hops": [hop.as_dict() for hop in self.hops],
            "notes": self.notes,
            "differences": self.differences,
            "seconds": round(self.seconds, 3),
        }

    def json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def write_diagram(self, path: Path) -> Path:
        from testbed.trace.diagram import render

        return render(self, path)


# ---------------------------------------------------------------- the request


@dataclass(frozen=True)
class Target:
    text: str
    ip: str
    port: int
    endpoints: list[dict[str, Any]]  # pod records that may answer
    target_port: int  # the port the endpoints listen on


def _pods(inv: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in inv["pods"]}


def parse_target(inv: dict[str, Any], text: str) -> Target:
    """DST[:PORT]: a pod name or IP, a service name or VIP; PORT defaults to the service's
    first port, or 8080 for a pod."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, ""
    if port_text and not port_text.isdigit():
        raise TraceError(f"destination {text!r}: expected DST[:PORT] with a numeric PORT")
    port = int(port_text) if port_text else None
    if port is not None and not 0 < port < 65536:
        raise TraceError(f"destination {text!r}: port {port} out of range 1-65535")
    pods = _pods(inv)
    for svc in inv.get("services", []):
        if host in (svc["name"], svc["vip"]):
            ports = {int(k): int(v) for k, v in svc["ports"].items()}
            chosen = port if port is not None else next(iter(ports))
            if chosen not in ports:
                raise TraceError(
                    f"service {svc['name']} has no port {chosen}; ports: {sorted(ports)}"
                )
            endpoints = [pods[name] for name in svc["endpoints"] if name in pods]
            return Target(text, svc["vip"], chosen, endpoints, ports[chosen])
    pod = pods.get(host) or next((p for p in pods.values() if p["ip"] == host), None)
    if pod is None:
        raise TraceError(
            f"destination {host!r}: no pod, service or VIP of this testbed by that name;"
            f" pods: {', '.join(pods)}"
        )
    chosen = port if port is not None else 8080
    return Target(text, pod["ip"], chosen, [pod], chosen)


WAYPOINT_LABEL = "gateway.networking.k8s.io/gateway-name"  # a waypoint's pod (a Gateway's)


def _is_system(pod: dict[str, Any]) -> bool:
    """A pod of the mesh itself: a ztunnel the mode added, or a waypoint."""
    return bool(pod.get("system")) or WAYPOINT_LABEL in pod.get("labels", {})


def path_places(inv: dict[str, Any], src: dict[str, Any], target: Target) -> list[Place]:
    """Every namespace the connection can cross, in path order (see testbed.trace.walk)."""
    nodes = {n["name"]: n for n in inv["nodes"]}
    system = [p for p in inv["pods"] if _is_system(p)]
    system.sort(key=lambda p: (not p["name"].startswith("ztunnel"), p["name"]))

    def node_places(node: str) -> list[Place]:
        found = [Place(node, nodes[node]["netns"], "node", node, nodes[node]["underlay_ip"])]
        found += [
            Place(p["name"], p["netns"], "proxy", node, p["ip"])
            for p in system
            if p["node"] == node and p["name"].startswith("ztunnel")
        ]
        return found

    places = [Place(src["name"], src["netns"], "pod", src["node"], src["ip"])]
    places += node_places(src["node"])
    if inv.get("fabric"):
        places.append(Place("fabric", inv["fabric"], "fabric"))
    places += [
        Place(p["name"], p["netns"], "proxy", p["node"], p["ip"])
        for p in system
        if not p["name"].startswith("ztunnel")
    ]
    for node in dict.fromkeys(e["node"] for e in target.endpoints):
        if node != src["node"]:
            places += node_places(node)
    places += [
        Place(e["name"], e["netns"], "pod", e["node"], e["ip"])
        for e in target.endpoints
        if e["name"] != src["name"]
    ]
    return places


# ---------------------------------------------------------------- the trace


def trace(target: HasInventory | dict[str, Any], src: str, dst: str) -> TraceResult:
    """Trace one connection from pod `src` to `dst` (DST[:PORT]) on a running testbed:
    a Cluster, or the inventory dict of a detached one (testbed.cluster.load_inventory)."""
    started = time.monotonic()
    inv = target if isinstance(target, dict) else target.inventory()
    pods = _pods(inv)
    if src not in pods:
        raise TraceError(f"source {src!r}: no pod of that name; pods: {', '.join(pods)}")
    source = pods[src]
    goal = parse_target(inv, dst)
    places = path_places(inv, source, goal)
    namespaces = {place.name: Netns(place.netns) for place in places}
    endpoints = [(Netns(e["netns"]), goal.target_port) for e in goal.endpoints]
    notes: list[str] = []
    sock = probe.client_socket(namespaces[src], source["ip"])
    tracing = None
    if tracing_usable():
        tracing = nftrace.Tracing(namespaces.values(), sock.getsockname()[1])
        tracing.start()
    else:
        notes.append("nftables tracing unavailable here: netfilter hops are counter deltas only")
    try:
        before = take_all(namespaces)
        with probe.listening(endpoints) as listener:
            outcome = probe.connect_once(sock, (goal.ip, goal.port))
            time.sleep(SETTLE)
            _await_records_closed(namespaces, before, outcome.started)
        after = take_all(namespaces, before)
    finally:
        sock.close()
        if tracing is not None:
            tracing.stop()
    events = tracing.events if tracing is not None else {}
    if tracing is not None and tracing.untraced:
        notes.append(
            f"nftables tracing did not start in {', '.join(tracing.untraced)}: counters only"
        )
    answered = _answering_pod(goal, outcome, listener)
    result = TraceResult(
        inv["run"],
        inv["facts"].get("mode", "?"),
        src,
        dst,
        _placement(source, goal, answered),
        outcome,
        [],
        places,
        0.0,
    )
    result.variant = str(inv["facts"].get("inpod_variant", ""))
    result.server_ip = next(
        (str(e["ip"]) for e in goal.endpoints if e["name"] == answered), goal.ip
    )
    result.notes = notes
    destinations = {f"{goal.ip}:{goal.port}"}
    destinations |= {f"{e['ip']}:{goal.target_port}" for e in goal.endpoints}
    result.hops = _walk(
        places, namespaces, before, after, outcome, answered, result.notes, events, destinations
    )
    result.differences = expected.differences(result)
    result.seconds = time.monotonic() - started
    return result


def _answering_pod(goal: Target, outcome: probe.Outcome, listener: probe.Listener) -> str | None:
    if len(goal.endpoints) == 1:
        return str(goal.endpoints[0]["name"])
    netns = listener.answered_by.get(outcome.token)
    return next((str(e["name"]) for e in goal.endpoints if e["netns"] == netns), None)


def _placement(source: dict[str, Any], goal: Target, answered: str | None) -> str:
    nodes = {e["name"]: e["node"] for e in goal.endpoints}
    node = nodes.get(answered or "", goal.endpoints[0]["node"] if goal.endpoints else None)
    return "same-node" if node == source["node"] else "cross-node"


def _walk(
    places: list[Place],
    namespaces: dict[str, Netns],
    before: dict[str, Snapshot],
    after: dict[str, Snapshot],
    outcome: probe.Outcome,
    answered: str | None,
    notes: list[str],
    events: dict[str, list[nftrace.TraceEvent]],
    destinations: set[str],
) -> list[Hop]:
    records = _trace_records(places, before, after, outcome, destinations)
    separable = bool(records)  # some proxy on the path served GET /connections
    keys = _flow_keys(outcome, records)
    diffs = {
        p.name: _diff(p, before[p.name], after[p.name], keys, separable, places, answered)
        for p in places
    }
    for place in places:
        diff = diffs[place.name]
        routing.add_routes(namespaces[place.name], place, diff)
        mine = events.get(namespaces[place.name].name, [])
        diff.traced = {h.rule.key: nftrace.packets_meeting(h.rule, mine) for h in diff.hits}
    proxy_hops = _proxy_hops(places, before, after, records, diffs, outcome, answered)
    hops: list[Hop] = []
    for place in places:
        if place.role == "pod" and place.name != places[0].name and place.name != answered:
            continue  # a service endpoint that did not get the connection
        hops += place_hops(
            place,
            diffs[place.name],
            proxy_hops.get(place.name, []),
            inbound=place.name == answered and place.name != places[0].name,
        )
    if outcome.seen_by_app:
        hops.append(
            Hop(
                "app",
                answered or "?",
                f"the server saw the connection from {outcome.seen_by_app}",
                "the throwaway listener's accepted peer",
                {"peer": outcome.seen_by_app},
            )
        )
    status = "closed normally" if outcome.ok else f"FAILED: {outcome.error}"
    hops.append(
        Hop(
            "result",
            places[0].name,
            f"connection {status}",
            "the client socket",
            {"ok": outcome.ok, "error": outcome.error},
        )
    )
    if not separable and any(after[p.name].proxy.found for p in places):
        notes.append(
            "no proxy served GET /connections: proxy hops come from /metrics deltas and"
            " conntrack entries past the first proxy are the ones new during the trace"
        )
    if any(s.conntrack_source == "unavailable" for s in after.values()):
        notes.append("conntrack could not be read in some namespaces")
    return number(hops)


def _trace_records(
    places: list[Place],
    before: dict[str, Snapshot],
    after: dict[str, Snapshot],
    outcome: probe.Outcome,
    destinations: set[str],
) -> dict[str, list[proxies.ProxyRecord]]:
    client = f"{outcome.source[0]}:{outcome.source[1]}"
    found: dict[str, list[proxies.ProxyRecord]] = {}
    for place in places:
        now = after[place.name].proxy.records
        if now is None:
            continue
        fresh = proxies.new_records(before[place.name].proxy.records or [], now)
        window = (outcome.started, outcome.ended)
        found[place.name] = [
            r
            for r in fresh
            if proxies.belongs_to(
                r,
                client=client,
                destinations=destinations,
                window=window,
                request_bytes=outcome.request_bytes,
            )
        ]
    # Past an L7 proxy the request carries the proxy's own headers (x-request-id...), so its
    # size no longer names the trace: the next hop's record is matched by the L7 proxy's
    # address as its peer, the time window and the destination instead. Two traces through
    # one L7 proxy at once leave two such records that nothing tells apart: neither is taken.
    l7_ips = {p.ip for p in places if p.ip and any(r.path == "l7" for r in found.get(p.name, []))}
    for place in places:
        now = after[place.name].proxy.records
        if now is None or not l7_ips:
            continue
        taken = {r.id for r in found.get(place.name, [])}
        candidates = [
            r
            for r in proxies.new_records(before[place.name].proxy.records or [], now)
            if r.id not in taken
            and proxies.behind_l7(r, l7_ips=l7_ips, destinations=destinations, window=window)
        ]
        if len(candidates) == 1:
            found.setdefault(place.name, []).extend(candidates)
    return found


def _endpoint(text: str | None) -> tuple[str, int] | None:
    if not text or ":" not in text:
        return None
    host, _, port = text.rpartition(":")
    return (host.strip("[]"), int(port)) if port.isdigit() else None


def _await_records_closed(
    namespaces: dict[str, Netns], before: dict[str, Snapshot], started: float
) -> None:
    """Until every proxy record opened since the trace started is closed (bounded): a record
    is matched to its trace by the bytes it carried, which it reports when it closes."""
    deadline = time.monotonic() + RECORDS_TIMEOUT
    while time.monotonic() < deadline:
        still_open = False
        for name, netns in namespaces.items():
            if before[name].proxy.records is None:
                continue
            since = max((r.id for r in before[name].proxy.records or []), default=0)
            records = proxies.read_proxy(netns, since).records or []
            still_open |= any(r.closed is None and r.opened >= started - 0.5 for r in records)
        if not still_open:
            return
        time.sleep(0.1)


def _flow_keys(
    outcome: probe.Outcome, records: dict[str, list[proxies.ProxyRecord]]
) -> set[tuple[str, int]]:
    keys = {outcome.source}
    for text in [outcome.seen_by_app] + [r.peer for rs in records.values() for r in rs]:
        endpoint = _endpoint(text)
        if endpoint:
            keys.add(endpoint)
    return keys


def _diff(
    place: Place,
    before: Snapshot,
    after: Snapshot,
    keys: set[tuple[str, int]],
    separable: bool,
    places: list[Place],
    answered: str | None,
) -> Diff:
    diff = Diff(conntrack_source=after.conntrack_source)
    diff.hits = netfilter.rule_hits(before.rules, after.rules)
    diff.missing = netfilter.missing_rules(before.rules, after.rules)
    diff.links = links.link_deltas(before.links, after.links)
    for delta in diff.links:  # a program ran where its device carried packets that way
        for direction, count in (("ingress", delta.rx_packets), ("egress", delta.tx_packets)):
            program = after.programs.get((delta.link.name, direction))
            if program and count > 0:
                diff.programs.append((f"{delta.link.name} tc {direction}", program))
    fresh = conntrack.new_entries(before.entries, after.entries)
    mine = [e for e in after.entries if conntrack.involves(e, keys)]
    if not separable:
        hbone_ends = {p.ip for p in places if p.role == "proxy" or p.name == answered}
        diff.unkeyed = [
            e
            for e in after.entries
            if e not in mine and e.original[3] == 15008 and e.original[2] in hbone_ends
        ]
        mine += diff.unkeyed
    hbone = [e for e in mine if e.original[3] == 15008]
    diff.entries = [e for e in mine if e in fresh or e in hbone]
    diff.reused = [e for e in diff.entries if e not in fresh]
    return diff


def _proxy_hops(
    places: list[Place],
    before: dict[str, Snapshot],
    after: dict[str, Snapshot],
    records: dict[str, list[proxies.ProxyRecord]],
    diffs: dict[str, Diff],
    outcome: probe.Outcome,
    answered: str | None,
) -> dict[str, list[Hop]]:
    """Proxy hops by the place they belong to: the proxy's own namespace when the traffic
    crossed it (legacy, ebpf, waypoints), else the pod whose namespace it listened in."""
    hops: dict[str, list[Hop]] = {}
    src = places[0].name

    def home(place: Place, direction: str) -> str:
        diff = diffs[place.name]
        # a waypoint terminates connections in its own netns, whatever its counters say
        crossed = diff.entries or diff.hits or diff.programs or not place.name.startswith("ztunnel")
        if place.role != "proxy" or crossed:
            return place.name
        return src if direction == "outbound" else (answered or place.name)

    for place in places:
        name = place.name if place.role == "proxy" else f"sidecar of {place.name}"
        ordered = sorted(
            records.get(place.name, []), key=lambda r: (r.direction != "outbound", r.opened)
        )
        for record in ordered:
            name = place.name if place.role == "proxy" else f"{record.proxy} of {place.name}"
            hops.setdefault(home(place, record.direction), []).append(
                record_hop(place, name, record)
            )
        if after[place.name].proxy.records is None:
            deltas = proxies.metric_deltas(
                before[place.name].proxy.metrics, after[place.name].proxy.metrics
            )
            by_reporter: dict[str, list[proxies.MetricDelta]] = {}
            for delta in deltas:
                by_reporter.setdefault(delta.labels.get("reporter", "?"), []).append(delta)
            for reporter in sorted(by_reporter, key=lambda r: r != "source"):
                group = by_reporter[reporter]
                hop = metric_hop(
                    place, name if place.role == "proxy" else f"proxy of {place.name}", group
                )
                hops.setdefault(home(place, hop.data["direction"]), []).append(hop)
    del outcome
    return hops
