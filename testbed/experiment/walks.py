"""The report's "How each mode moves a connection": one traced walk per mode and placement.

Once per mode, right after its cluster is up and before its first measured case, the
runner traces one client -> server connection per placement (testbed.trace), and once
more through the waypoint where the mode runs the waypoint path. Each walk leaves
figures/<stem>.svg and .png and walks/<stem>.txt in the run directory. A trace is evidence,
not a measurement: one that fails becomes a note in the metadata, never a failed run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WALKS_DIR = "walks"
FIGURES_DIR = "figures"
WALK_PLACEMENTS = ("same-node", "cross-node")
WALK_PORT = 8080  # the trace starts a throwaway listener there when nothing listens
SECTION_HEADING = "## How each mode moves a connection"

# trace(cluster, src, dst) -> a TraceResult (testbed.trace.trace); tests pass a fake.
Tracer = Callable[[Any, str, str], Any]
# (path, servers): puts the cluster on a data path (the runner's PathControl.switch).
Switch = Callable[[str, Sequence[Any]], None]
# (path, server): the server as that path addresses it (PathControl.destination).
Destination = Callable[[str, Any], Any]


def real_tracer(cluster: Any, src: str, dst: str) -> Any:
    from testbed.trace import trace

    return trace(cluster, src, dst)


def walk_stem(mode_label: str, placement: str, waypoint: bool = False) -> str:
    return f"walk-{mode_label}-{placement}" + ("-waypoint" if waypoint else "")


@dataclass
class ModeWalks:
    """What tracing one mode left: the stems written and a note per trace that failed."""

    stems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def trace_mode_walks(
    cluster: Any,
    mode_label: str,
    run_dir: Path,
    *,
    waypoint: bool,
    switch: Switch,
    destination: Destination,
    tracer: Tracer = real_tracer,
) -> ModeWalks:
    """Trace every placement (and through the waypoint when `waypoint`); never raises
    for a failed trace. With the waypoint, the cluster is put back on the hbone path after."""
    found = ModeWalks()
    pairs: dict[str, tuple[Any, Any]] = {}
    for placement in WALK_PLACEMENTS:
        try:
            pairs[placement] = cluster.pair(placement)
        except Exception as exc:  # a topology without this placement
            found.notes.append(f"{placement}: no client/server pair: {exc}")
    for placement, (client, server) in pairs.items():
        _one_walk(found, run_dir, walk_stem(mode_label, placement), tracer, cluster, client, server)
    if not waypoint or not pairs:
        return found
    servers = list({id(s): s for _, s in pairs.values()}.values())
    try:
        switch("waypoint", servers)
    except Exception as exc:
        found.notes.append(f"waypoint: could not attach it: {type(exc).__name__}: {exc}")
        return found
    try:
        for placement, (client, server) in pairs.items():
            target = destination("waypoint", server)
            stem = walk_stem(mode_label, placement, waypoint=True)
            _one_walk(found, run_dir, stem, tracer, cluster, client, target)
    finally:
        switch("hbone", servers)  # as the cluster was built; the first case switches anyway
    return found


def _one_walk(
    found: ModeWalks,
    run_dir: Path,
    stem: str,
    tracer: Tracer,
    cluster: Any,
    client: Any,
    server: Any,
) -> None:
    try:
        result = tracer(cluster, client.name, f"{server.ip}:{WALK_PORT}")
        walks = run_dir / WALKS_DIR
        figures = run_dir / FIGURES_DIR
        walks.mkdir(parents=True, exist_ok=True)
        figures.mkdir(parents=True, exist_ok=True)
        (walks / f"{stem}.txt").write_text(result.text() + "\n")
        result.write_diagram(figures / f"{stem}.svg")
        result.write_diagram(figures / f"{stem}.png")
    except Exception as exc:  # evidence, not a measurement: the run goes on
        found.notes.append(f"{stem}: trace failed: {type(exc).__name__}: {exc}")
        return
    found.stems.append(stem)


# ---------------------------------------------------------------- the report's section


def walks_section(run_dir: Path, metadata: dict[str, Any]) -> str:
    """Per mode (in the spec's order): its diagrams and text walks, and the traces that
    failed; empty when the run traced nothing."""
    parts: list[str] = []
    modes = metadata.get("modes", {})
    for label in _spec_order(metadata):
        info = modes[label]
        stems = [str(s) for s in info.get("walks", [])]
        notes = [str(n) for n in info.get("walk_notes", [])]
        if not stems and not notes:
            continue
        parts.append(f"### {label}\n")
        for stem in stems:
            parts.append(_walk_entry(run_dir, stem))
        parts += [f"- not traced: {note}" for note in notes]
        if notes:
            parts.append("")
    if not parts:
        return ""
    intro = (
        "One connection per placement (and through the waypoint where the mode has L7), "
        "traced on each mode's cluster before its first measured case (`testbed trace`); "
        "its numbers are in the sections above.\n"
    )
    return "\n".join([SECTION_HEADING + "\n", intro, *parts]) + "\n"


def _spec_order(metadata: dict[str, Any]) -> list[str]:
    """The mode labels as the spec lists them (metadata.json stores its keys sorted)."""
    modes = metadata.get("modes", {})
    listed = [str(m.get("label", "")) for m in metadata.get("spec", {}).get("modes", [])]
    return [label for label in listed if label in modes] + [
        label for label in modes if label not in listed
    ]


def _walk_entry(run_dir: Path, stem: str) -> str:
    lines = [f"#### {stem}\n"]
    png = run_dir / FIGURES_DIR / f"{stem}.png"
    if png.exists():
        lines.append(f"![{stem}]({FIGURES_DIR}/{stem}.png)\n")
    text = run_dir / WALKS_DIR / f"{stem}.txt"
    if text.exists():
        lines += ["```", text.read_text().rstrip("\n"), "```\n"]
    return "\n".join(lines)
