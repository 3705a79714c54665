"""Which ip rule and table decided a hop: `ip route get` for the trace's first flow in a
namespace, with each mark the namespace's matched rules set (routing is state, not a
counter: this asks the kernel now, after the connection, with the marks it carried)."""

from __future__ import annotations

import json
import re
from typing import Any

from testbed.netlab import Netns
from testbed.trace.walk import Diff, Place

# packet marks only: a CONNMARK sets the connection's mark, which routing does not see
_MARK = re.compile(r"(?:-j MARK --set-xmark|--tproxy-mark|meta mark set) (0x[0-9a-f]+)")


def marks_set(diff: Diff) -> list[int]:
    found: list[int] = []
    for hit in diff.hits:
        match = _MARK.search(hit.rule.spec)
        if match and int(match.group(1), 16) not in found:
            found.append(int(match.group(1), 16))
    return found


def _route_get(netns: Netns, argv: list[str]) -> dict[str, Any] | None:
    done = netns.run(["ip", "-j", "route", "get", *argv], check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return None
    routes: list[dict[str, Any]] = json.loads(done.stdout)
    return routes[0] if routes else None


def _input_device(netns: Netns, src: str) -> str | None:
    """The device a packet from `src` arrives on: the main table's route back to it."""
    done = netns.run(["ip", "-j", "route", "show", "table", "main"], check=False)
    for route in json.loads(done.stdout or "[]"):
        if route.get("dst") == src:
            return str(route.get("dev"))
    return None


def rule_for(rules: list[dict[str, Any]], mark: int, table: str) -> str:
    """The first ip rule that sends a packet with `mark` to `table` (text as `ip rule`)."""
    for rule in rules:
        fwmark = rule.get("fwmark")
        if fwmark is not None:
            mask = int(rule.get("fwmask", "0xffffffff"), 16)
            if mark & mask != int(fwmark, 16) & mask:
                continue
        lookup = str(rule.get("table", ""))
        if lookup in (table, "local") and (lookup == table or table == "local"):
            text = (
                f"{rule.get('priority')}: fwmark {fwmark}/{rule.get('fwmask', '')}"
                if (fwmark is not None)
                else f"{rule.get('priority')}: from all"
            )
            return f"{text} lookup {lookup}"
    return f"table {table}"


def add_routes(netns: Netns, place: Place, diff: Diff) -> None:
    """Fill diff.routes for the place's first flow (the one the trace created first)."""
    if not diff.entries or place.role == "fabric":
        return
    first = diff.entries[0]
    src, _, dst, _ = first.original
    if first.nat.startswith("DNAT"):
        dst = first.reply[0]  # forwarded packets are routed after PREROUTING's DNAT
    local = place.ip == src
    iif = None if local or place.role == "pod" else _input_device(netns, src)
    if not local and iif is None:
        return
    rules = json.loads(netns.run(["ip", "-j", "rule", "show"], check=False).stdout or "[]")
    shown = set()
    for mark in [0, *marks_set(diff)]:
        argv = (
            [dst, "from", src]
            + (["iif", iif] if iif else [])
            + (["mark", hex(mark)] if mark else [])
        )
        route = _route_get(netns, argv)
        if route is None:
            continue
        table = str(route.get("table", "main"))
        via = f"via {route['gateway']} " if route.get("gateway") else ""
        key = (table, via, route.get("dev"))
        if key in shown or (mark and table == "main"):
            continue
        shown.add(key)
        why = rule_for(rules, mark, table) if table != "main" else "main table"
        kind = f"{route.get('type')} " if route.get("type") not in (None, "unicast") else ""
        mark_text = f" mark {hex(mark)}" if mark else ""
        diff.routes.append(
            (
                f"{src} -> {dst}{mark_text}: {why} -> {kind}{via}dev {route.get('dev')}",
                "ip route get (current routing state, asked with the marks the rules set)",
            )
        )
