"""`testbed run SPEC`: load and check the spec, run it, store the results, report."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from testbed.experiment.environment import describe_environment
from testbed.experiment.peers import PEER_FACTS, PEER_TOOLS
from testbed.experiment.pinning import describe_pinning
from testbed.experiment.runner import Runner, RunOutcome, utc_now
from testbed.experiment.spec import ExperimentSpec, SpecError, load_spec
from testbed.experiment.store import RunStore


class ExperimentInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; what was measured is stored under run_dir."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(f"interrupted; partial results in {run_dir}")
        self.run_dir = run_dir


def _available_modes() -> list[str]:
    from testbed.redirect import available_modes

    return list(available_modes())


def _check_topology(spec_path: Path, spec: ExperimentSpec) -> None:
    from testbed.cluster.loader import load_topology
    from testbed.cluster.model import TopologyError

    try:
        load_topology(spec.topology.as_argument())
    except TopologyError as exc:
        raise SpecError(f"{spec_path}: topology: {exc}") from exc


def _check_peers(spec_path: Path, spec: ExperimentSpec) -> None:
    for peer in spec.peers:
        tool = PEER_TOOLS[peer]
        if shutil.which(tool) is None:
            raise SpecError(
                f"{spec_path}: peers: {peer} needs {tool}, not found on PATH "
                f"(Debian: apt-get install {tool})"
            )


def _fallbacks(mode_facts: dict[str, dict[str, str]]) -> list[str]:
    """Facts that differ from the mode's nominal setup, e.g. tunnel=vxlan (no geneve)."""
    return sorted(
        {f"{k}={v}" for facts in mode_facts.values() for k, v in facts.items() if k != "mode"}
    )


def build_metadata(
    spec: ExperimentSpec, store: RunStore, spec_path: Path, started_at: str
) -> dict[str, Any]:
    return {
        "experiment": spec.name,
        "run_id": store.run_id,
        "spec_file": str(spec_path),
        "started_at": started_at,
        "status": "running",
        "environment": describe_environment(),
        "pinning": describe_pinning(spec.pinning),
        "modes": {m.label: {"mode": m.mode, "options": m.options} for m in spec.modes},
        "peers": {peer: {"on": "none", "what": PEER_FACTS[peer]} for peer in spec.peers},
        "spec": spec.model_dump(mode="json"),
    }


def finish_metadata(metadata: dict[str, Any], outcome: RunOutcome, status: str) -> dict[str, Any]:
    for label, facts in outcome.mode_facts.items():
        metadata["modes"][label]["facts"] = facts
    for label, cluster_run in outcome.cluster_runs.items():
        metadata["modes"][label]["cluster_run"] = cluster_run
    for label, error in outcome.cluster_errors.items():
        metadata["modes"][label]["cluster_error"] = error
    _walk_metadata(metadata, outcome)
    return {
        **metadata,
        "status": status,
        "finished_at": utc_now(),
        "cases_ok": outcome.cases_ok,
        "cases_failed": outcome.cases_failed,
        "fallbacks": _fallbacks(outcome.mode_facts),
    }


def _walk_metadata(metadata: dict[str, Any], outcome: RunOutcome) -> None:
    """Which walks each mode's trace wrote (the report's "How each mode moves a
    connection") and the traces that failed."""
    for label, stems in outcome.walks.items():
        metadata["modes"][label]["walks"] = stems
    for label, notes in outcome.walk_notes.items():
        metadata["modes"][label]["walk_notes"] = notes


def execute(spec_path: Path, spec: ExperimentSpec, store: RunStore, runner: Runner) -> RunOutcome:
    """Run and always leave results.parquet, results.csv and metadata.json behind."""
    store.save_spec(spec_path)
    metadata = build_metadata(spec, store, spec_path, utc_now())
    store.write_metadata(metadata)
    status = "aborted"  # the runner itself crashed, or a second Ctrl-C hit between cases
    try:
        outcome = runner.run()
        status = "interrupted" if outcome.interrupted else "complete"
    finally:
        store.finalize(runner.steadiness_columns())
        finished = finish_metadata(metadata, runner.outcome, status)
        store.write_metadata({**finished, "steadiness": runner.steadiness_metadata()})
    return outcome


def run_experiment(
    spec_path: Path,
    *,
    results_dir: Path = Path("results"),
    report: bool = False,
    show_progress: bool = True,
    available_modes: Callable[[], Sequence[str]] = _available_modes,
) -> Path:
    """Run a spec; returns the run directory. Raises SpecError for a bad spec (before
    anything is built) and ExperimentInterrupted after storing a Ctrl-C'd run."""
    spec = load_spec(spec_path, available_modes=available_modes)
    _check_topology(spec_path, spec)
    _check_peers(spec_path, spec)
    store = RunStore.create(results_dir, spec.name)
    outcome = execute(spec_path, spec, store, Runner(spec, store, show_progress=show_progress))
    if report:
        from testbed.experiment.report import write_report

        write_report(store.path)
    if outcome.interrupted:
        raise ExperimentInterrupted(store.path)
    return store.path
