"""The report's walks: what the runner writes per mode, and the section made of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from test_experiment_fakes import (
    SMALL_SPEC,
    FakeClusterFactory,
    FakePaths,
    fake_runner,
    load_fake_spec,
)

from testbed.experiment.run import execute
from testbed.experiment.store import RunStore
from testbed.experiment.walks import SECTION_HEADING, walks_section

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeTrace:
    def __init__(self, src: str, dst: str) -> None:
        self.src, self.dst = src, dst

    def text(self) -> str:
        return f"trace {self.src} -> {self.dst}\n1. {self.src}: OUTPUT nat REDIRECT -> 15001"

    def write_diagram(self, path: Path) -> Path:
        path.write_bytes(PNG_MAGIC if path.suffix == ".png" else b"<svg/>")
        return path


class FakeTracer:
    """Traces succeed except to `failing` (a destination address)."""

    def __init__(self, failing: str = "") -> None:
        self.calls: list[tuple[str, str]] = []
        self.failing = failing

    def __call__(self, cluster: Any, src: str, dst: str) -> FakeTrace:
        self.calls.append((src, dst))
        if self.failing and dst.startswith(self.failing):
            raise RuntimeError("no route to host")
        return FakeTrace(src, dst)


def run_traced(tmp_path: Path, text: str, tracer: FakeTracer, paths: FakePaths) -> Path:
    spec_path, spec = load_fake_spec(tmp_path, text)
    store = RunStore.create(tmp_path / "results", spec.name)
    runner = fake_runner(spec, store, FakeClusterFactory(), paths=paths, tracer=tracer)
    execute(spec_path, spec, store, runner)
    return store.path


WAYPOINT_SPEC = SMALL_SPEC.replace("[none, inpod]", "[none, inpod]\npaths: [hbone, waypoint]")


def test_each_mode_traces_every_placement_before_its_first_case(tmp_path: Path) -> None:
    tracer, paths = FakeTracer(), FakePaths()
    run_dir = run_traced(tmp_path, WAYPOINT_SPEC, tracer, paths)
    walks = sorted(p.name for p in (run_dir / "walks").iterdir())
    assert walks == [
        "walk-inpod-cross-node-waypoint.txt",
        "walk-inpod-cross-node.txt",
        "walk-inpod-same-node-waypoint.txt",
        "walk-inpod-same-node.txt",
        "walk-none-cross-node.txt",
        "walk-none-same-node.txt",
    ]
    assert (run_dir / "figures" / "walk-inpod-same-node-waypoint.png").read_bytes() == PNG_MAGIC
    assert (run_dir / "figures" / "walk-none-cross-node.svg").exists()
    # the waypoint walks go to the service VIP; the waypoint is attached for them, then
    # detached again, before the first case puts the cluster on its own path
    assert ("client", "10.96.0.99:8080") in tracer.calls
    # (none: its one case on direct; inpod: attach, detach for the walks, then its cases)
    assert [path for path, _ in paths.switches][:4] == ["direct", "waypoint", "hbone", "hbone"]
    modes = json.loads((run_dir / "metadata.json").read_text())["modes"]
    assert modes["none"]["walks"] == ["walk-none-same-node", "walk-none-cross-node"]
    assert modes["inpod"]["walk_notes"] == []


def test_a_failed_trace_is_a_note_and_the_cases_still_run(tmp_path: Path) -> None:
    run_dir = run_traced(tmp_path, SMALL_SPEC, FakeTracer(failing="10.244.2.2"), FakePaths())
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["cases_failed"] == 0 and metadata["cases_ok"] == 4
    notes = metadata["modes"]["none"]["walk_notes"]
    assert len(notes) == 2 and "no route to host" in notes[0]
    assert metadata["modes"]["none"]["walks"] == []


def test_trace_false_traces_nothing(tmp_path: Path) -> None:
    tracer = FakeTracer()
    run_dir = run_traced(tmp_path, SMALL_SPEC + "trace: false\n", tracer, FakePaths())
    assert tracer.calls == [] and not (run_dir / "walks").exists()


def write_fixture_walks(run_dir: Path) -> dict[str, Any]:
    (run_dir / "walks").mkdir(parents=True)
    (run_dir / "figures").mkdir()
    stems = {
        "none": ["walk-none-same-node", "walk-none-cross-node"],
        "inpod": ["walk-inpod-same-node", "walk-inpod-cross-node"],
    }
    for stem in stems["none"] + stems["inpod"]:
        (run_dir / "walks" / f"{stem}.txt").write_text(f"trace of {stem}\n1. hop\n")
        (run_dir / "figures" / f"{stem}.png").write_bytes(PNG_MAGIC)
    notes = {"none": [], "inpod": ["walk-inpod-x-waypoint: trace failed: boom"]}
    return {  # as metadata.json holds them: modes sorted, the spec's order in "spec"
        "modes": {
            label: {"mode": label, "walks": stems[label], "walk_notes": notes[label]}
            for label in ("inpod", "none")
        },
        "spec": {"modes": [{"mode": "none", "label": "none"}, {"mode": "inpod", "label": "inpod"}]},
    }


def test_section_has_one_entry_per_mode_and_placement(tmp_path: Path) -> None:
    metadata = write_fixture_walks(tmp_path)
    text = walks_section(tmp_path, metadata)
    assert text.startswith(SECTION_HEADING)
    assert text.index("### none") < text.index("### inpod")
    for stem in ("walk-none-same-node", "walk-none-cross-node", "walk-inpod-cross-node"):
        assert text.count(f"#### {stem}\n") == 1
        assert f"![{stem}](figures/{stem}.png)" in text
        assert f"```\ntrace of {stem}\n1. hop\n```" in text
    assert "- not traced: walk-inpod-x-waypoint: trace failed: boom" in text


def test_section_is_empty_without_walks(tmp_path: Path) -> None:
    assert walks_section(tmp_path, {"modes": {"none": {"mode": "none"}}}) == ""
