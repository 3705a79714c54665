"""The walk as a figure in the style of the classic ambient diagrams (Graphviz `dot`).

Nodes are boxes holding their pods and proxies; the connection is numbered arrows between
the places it touched, in walk order; rules, tunnels and programs that acted are written
on the arrow leaving the place where they acted; plaintext segments are drawn solid grey,
mTLS (HBONE) segments solid green, and the failed end of a broken connection dashed red.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import graphviz

from testbed.netlab.errors import TestbedError

if TYPE_CHECKING:
    from testbed.trace.run import TraceResult
    from testbed.trace.walk import Hop

HBONE_PORT = 15008
PLAINTEXT, MTLS, FAILED = "#555555", "#1b7f3b", "#c0392b"
FORMATS = (".svg", ".png")
_ACTIONS = frozenset(
    {
        "REDIRECT",
        "TPROXY",
        "DNAT",
        "SNAT",
        "MARK",
        "DROP",
        "REJECT",
        "redirect",
        "tproxy",
        "dnat",
        "drop",
    }
)


class DiagramError(TestbedError, ValueError):
    """An output file name this module cannot render (not .svg or .png)."""


def segments(result: TraceResult) -> list[tuple[str, str, list[str], bool]]:
    """(from place, to place, labels, mTLS?) for each move between places in walk order."""
    order = [hop for hop in result.hops if hop.kind != "result"]
    moves: list[tuple[str, str, list[str], bool]] = []
    labels: list[str] = []
    current, secure = result.source, False
    alias: dict[str, str] = {}  # a pod whose netns a proxy listens in: drawn as that proxy
    for hop in order:
        where = alias.get(hop.netns, hop.netns)
        if hop.kind == "proxy" and where != current and hop.netns != current:
            alias = {current: hop.netns}  # inpod/sidecar: the proxy works in the pod's netns
        elif hop.kind == "app" or where not in (current, *alias.values()):
            alias, where = {}, hop.netns
        if where != current:
            moves.append((current, where, labels, secure))
            current, labels = where, []
        label = _label(hop)
        if label and label not in labels:
            labels.append(label)
        secure = _secure_after(hop, secure)
    return moves


def _secure_after(hop: Hop, secure: bool) -> bool:
    """Whether what leaves this hop is inside HBONE (mTLS)."""
    if hop.kind == "conntrack" and hop.data["original"][3] == HBONE_PORT:
        return True  # an HBONE connection crossed this place
    if hop.kind != "proxy":
        return secure
    path = str(hop.data.get("path", ""))
    if hop.data.get("fallback") == "metrics":
        onward = hop.data.get("direction") == "outbound" or bool(hop.data.get("waypoint"))
        return bool(hop.data.get("mtls")) and onward
    if hop.data.get("direction") == "inbound":
        return False
    return path in ("hbone", "waypoint")


def _label(hop: Hop) -> str:
    if hop.kind == "netfilter" and not hop.data.get("removed"):
        words = hop.detail.split(" (")[0].split(" ")
        acting = next((i for i, w in enumerate(words) if w in _ACTIONS), None)
        return "" if acting is None else " ".join([hop.data["chain"], *words[acting : acting + 3]])
    if hop.kind == "link" and hop.data.get("kind") in ("vxlan", "geneve"):
        return f"{hop.data['kind']} {hop.data['device']} VNI {hop.data.get('vni')}"
    if hop.kind == "conntrack" and hop.data["original"][3] == HBONE_PORT:
        return f"HBONE -> {hop.data['original'][2]}:{HBONE_PORT}"
    if hop.kind == "ebpf":
        return f"bpf {hop.data.get('program')}"
    if hop.kind == "proxy":
        listener = hop.data.get("listener")
        return f"{hop.data.get('proxy')} {hop.data.get('direction')}" + (
            f" :{listener}" if listener else ""
        )
    return ""


def dot_source(result: TraceResult) -> graphviz.Digraph:
    graph = graphviz.Digraph(
        "trace",
        graph_attr={
            "rankdir": "LR",
            "fontname": "Helvetica",
            "label": _title(result),
            "labelloc": "t",
            "compound": "true",
            "nodesep": "0.3",
        },
    )
    graph.attr(
        "node",
        shape="box",
        style="rounded,filled",
        fillcolor="#eef3fb",
        fontname="Helvetica",
        fontsize="11",
    )
    graph.attr("edge", fontname="Helvetica", fontsize="9")
    touched = {hop.netns for hop in result.hops}
    for node in dict.fromkeys(p.node for p in result.places if p.node):
        with graph.subgraph(name=f"cluster_{node}") as box:
            box.attr(label=node, style="rounded", color="#7a869a")
            for place in result.places:
                if place.node == node and (place.role != "node" and place.name in touched):
                    color = "#fdf1dc" if place.role == "proxy" else "#eef3fb"
                    box.node(place.name, f"{place.name}\n{place.ip or ''}", fillcolor=color)
            if node in touched:
                box.node(node, f"{node} netns", shape="ellipse", fillcolor="#ffffff")
    if "fabric" in touched:
        graph.node("fabric", "fabric (underlay bridge)", shape="ellipse", fillcolor="#ffffff")
    moves = segments(result)
    for step, (frm, to, labels, secure) in enumerate(moves, start=1):
        failed = not result.outcome.ok and step == len(moves)
        color = FAILED if failed else (MTLS if secure else PLAINTEXT)
        text = f"{step}" + ("\n" + "\n".join(labels[:3]) if labels else "")
        graph.edge(
            frm,
            to,
            label=text,
            color=color,
            fontcolor=color,
            style="dashed" if failed else "solid",
            penwidth="2",
        )
    with graph.subgraph(name="cluster_legend") as legend:
        legend.attr(label="legend", style="dotted")
        legend.node(
            "l_plain", "plaintext", color=PLAINTEXT, fontcolor=PLAINTEXT, fillcolor="#ffffff"
        )
        legend.node("l_mtls", "mTLS (HBONE)", color=MTLS, fontcolor=MTLS, fillcolor="#ffffff")
    return graph


def _title(result: TraceResult) -> str:
    state = "connected" if result.outcome.ok else f"failed: {result.outcome.error}"
    return f"{result.mode}: {result.source} -> {result.destination} ({result.placement}, {state})"


def arrow_count(result: TraceResult) -> int:
    return len(segments(result))


def render(result: TraceResult, path: Path) -> Path:
    """Write the diagram to `path` (.svg or .png); returns the path written."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DiagramError(f"--diagram {path}: expected a .svg or .png file name")
    graph = dot_source(result)
    data = graph.pipe(format=suffix[1:])
    path.write_bytes(data)
    return path
