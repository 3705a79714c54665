"""Each mode's usual walk, as ordered patterns a trace is compared against.

A step is (where, kind, pattern): `where` is a role resolved per trace (client, server,
client-node, server-node, client-ztunnel, server-ztunnel, any), `pattern` a regular
expression over the hop's detail, with {client_ip} and {server_ip} filled in. The steps
must appear in this order (other hops may come between); `never` steps must not appear.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testbed.trace.run import TraceResult
    from testbed.trace.walk import Hop


@dataclass(frozen=True)
class Step:
    where: str
    kind: str
    pattern: str
    placement: str = "any"  # same-node | cross-node | any

    def describe(self) -> str:
        return f"{self.where}: {self.kind} matching {self.pattern!r}"


APP = Step("server", "app", r"from {client_ip}:")
_INPOD_HEAD = [
    Step("client-ztunnel", "proxy", "outbound"),
    Step("client", "conntrack", r"-> {server_ip}:15008 "),
    Step("server-ztunnel", "proxy", "inbound"),
    APP,
]
WALKS: dict[str, list[Step]] = {
    "none": [Step("client-node", "link", "veth"), APP],
    "inpod/redirect": [
        Step("client", "netfilter", "nat ISTIO_OUTPUT REDIRECT -> 15001"),
        *_INPOD_HEAD,
    ],
    "inpod/tproxy": [
        Step("client", "netfilter", "nat ISTIO_OUTPUT REDIRECT -> 15001"),
        Step("client-ztunnel", "proxy", "outbound"),
        Step("server", "netfilter", r"mangle ISTIO_PRERT TPROXY -> 15008 "),
        Step("server-ztunnel", "proxy", "inbound"),
        APP,
    ],
    "inpod/nftables": [
        Step("client", "netfilter", "istio-output redirect to :15001"),
        *_INPOD_HEAD,
    ],
    "legacy": [
        Step("client-node", "netfilter", r"ztunnel-PREROUTING MARK --set-xmark 0x100/0x100"),
        Step("client-node", "route", r"lookup 101 -> via \S+ dev istioout"),
        Step("client-node", "link", r"istioout VNI 1001"),
        Step("client-ztunnel", "netfilter", r"TPROXY -> 15001 "),
        Step("client-ztunnel", "proxy", "outbound"),
        Step("server-ztunnel", "netfilter", r"TPROXY -> 15008 ", "cross-node"),
        Step("server-ztunnel", "proxy", "inbound"),
        APP,
    ],
    "ebpf": [
        Step("client-node", "ebpf", r"tc ingress: app_outbound"),
        Step("client-ztunnel", "ebpf", r"tc ingress: ztunnel_tproxy"),
        Step("client-ztunnel", "proxy", "outbound"),
        Step("server-ztunnel", "proxy", "inbound"),
        APP,
    ],
    "sidecar": [
        Step("client", "netfilter", r"ISTIO_REDIRECT REDIRECT -> 15001"),
        Step("client", "proxy", "outbound"),
        Step("client", "conntrack", r"-> {server_ip}:15008 "),
        Step("server", "proxy", "inbound"),
        APP,
    ],
}
NEVER: dict[str, list[Step]] = {
    "inpod/redirect": [Step("server", "netfilter", "REDIRECT -> 15006")],
    "inpod/nftables": [Step("server", "netfilter", "redirect to :15006")],
    "sidecar": [Step("server", "netfilter", "REDIRECT -> 15006")],
}


def walk_name(result: TraceResult) -> str:
    return result.mode if result.mode != "inpod" else f"inpod/{result.variant or 'redirect'}"


def _roles(result: TraceResult) -> dict[str, str]:
    places = {p.name: p for p in result.places}
    server = next((h.netns for h in result.hops if h.kind == "app"), result.destination)
    client_node = places[result.source].node or ""
    server_node = places[server].node if server in places else client_node
    return {
        "client": result.source,
        "server": server,
        "client-node": client_node,
        "server-node": server_node or "",
        "client-ztunnel": f"ztunnel-{client_node}",
        "server-ztunnel": f"ztunnel-{server_node}",
    }


def _matches(step: Step, hop: Hop, roles: dict[str, str], values: dict[str, str]) -> bool:
    if step.kind != hop.kind or (step.where != "any" and roles.get(step.where) != hop.netns):
        return False
    pattern = step.pattern.format(**{k: re.escape(v) for k, v in values.items()})
    return re.search(pattern, hop.detail) is not None


WAYPOINT = Step("any", "proxy", r"^waypoint ")
# behind a waypoint the app sees the waypoint as its peer, never the client (as with Istio)
APP_BEHIND_WAYPOINT = Step("server", "app", r"from (?!{client_ip}:)\d")
# with a waypoint, the client's ztunnel sends HBONE to the waypoint, not to the server
_REPLACED_BY_WAYPOINT = ("outbound", r"-> {server_ip}:15008 ")


# the same-node fast path (legacy, ebpf): the client's ztunnel hands the connection to its
# own inbound side in-process (record path "local"), no inbound record of its own
_SERVED_IN_PROCESS = ("server-ztunnel", "proxy", "inbound")


def _fast_path(result: TraceResult) -> bool:
    return any(h.kind == "proxy" and h.data.get("path") == "local" for h in result.hops)


def _steps(result: TraceResult) -> list[Step]:
    fast_path = _fast_path(result)
    steps = [
        s
        for s in WALKS.get(walk_name(result), [])
        if s.placement in ("any", result.placement)
        and not (fast_path and (s.where, s.kind, s.pattern) == _SERVED_IN_PROCESS)
    ]
    if not any(h.kind == "proxy" and h.netns.startswith("waypoint") for h in result.hops):
        return steps
    kept = [
        APP_BEHIND_WAYPOINT if s is APP else s
        for s in steps
        if s.pattern not in _REPLACED_BY_WAYPOINT
    ]
    at = next((i for i, s in enumerate(kept) if s.where == "server-ztunnel"), len(kept) - 1)
    return [*kept[:at], WAYPOINT, *kept[at:]]


def differences(result: TraceResult) -> list[str]:
    """What differs from the mode's usual walk: missing steps, forbidden ones present,
    and a failed connection."""
    steps = _steps(result)
    roles = _roles(result)
    values = {"client_ip": result.outcome.source[0], "server_ip": result.server_ip}
    found: list[str] = []
    position = 0
    for step in steps:
        index = next(
            (
                i
                for i in range(position, len(result.hops))
                if _matches(step, result.hops[i], roles, values)
            ),
            None,
        )
        if index is None:
            found.append(f"missing: {step.describe()}")
        else:
            position = index + 1
    for step in NEVER.get(walk_name(result), []):
        hop = next((h for h in result.hops if _matches(step, h, roles, values)), None)
        if hop is not None:
            found.append(f"unexpected: step {hop.step} {hop.netns}: {hop.detail}")
    if not result.outcome.ok:
        found.append(f"the connection failed: {result.outcome.error}")
    return found
