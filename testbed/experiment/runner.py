"""The matrix runner: a fresh cluster per mode, every case with its warm-up, rows as it goes.

A case that fails is recorded with its error and the run goes on; a cluster that cannot
be built fails all of its mode's cases. Ctrl-C (KeyboardInterrupt) ends the run after
recording the interrupted case; the cluster's context manager tears it down, and the
caller finalizes the store with whatever was measured.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from testbed.experiment.cases import (
    CLUSTER_BUILD_SECONDS,
    PATH_SWITCH_SECONDS,
    Case,
    case_seconds,
    mode_cases,
    mode_seconds,
    separate_warmup,
)
from testbed.experiment.paths import ClusterPaths
from testbed.experiment.pinning import apply_pinning
from testbed.experiment.progress import RunProgress
from testbed.experiment.rows import case_row, failed_row, measurement_rows
from testbed.experiment.spec import ExperimentSpec, ModeSpec
from testbed.experiment.store import RunStore
from testbed.experiment.walks import Tracer, real_tracer, trace_mode_walks
from testbed.experiment.workloads import WORKLOADS, MeasurementLike, WorkloadFunction


class ClusterLike(Protocol):
    def pair(self, placement: str) -> tuple[Any, Any]: ...

    def proxy_pids(self) -> dict[str, int]: ...

    def facts(self) -> dict[str, str]: ...


class SamplerLike(Protocol):
    def measurements(self) -> Sequence[MeasurementLike]: ...


class PathControl(Protocol):
    """How the runner puts a cluster on a data path (testbed.experiment.paths)."""

    def topology(self, topology: str, paths: Sequence[str]) -> Any:
        """What the cluster is built from for a mode running `paths`."""

    def facts(self, cluster: Any) -> dict[str, str]:
        """After the build: what the rows say about the paths' set-up."""

    def switch(self, cluster: Any, path: str, servers: Sequence[Any]) -> None: ...

    def destination(self, cluster: Any, path: str, server: Any) -> Any: ...


ClusterFactory = Callable[..., AbstractContextManager[ClusterLike]]
SamplerFactory = Callable[[dict[str, int], float], AbstractContextManager[SamplerLike]]


def real_cluster_factory(
    topology: Any, *, mode: str, mode_options: Mapping[str, Any]
) -> AbstractContextManager[ClusterLike]:
    from testbed.cluster.cluster import Cluster
    from testbed.redirect import create_mode

    return Cluster(topology, create_mode(mode, mode_options))


def real_sampler_factory(pids: dict[str, int], interval: float) -> AbstractContextManager[Any]:
    from testbed.measure.resources import ResourceSampler

    return ResourceSampler(pids, interval, machine=True)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class RunOutcome:
    cases_ok: int = 0
    cases_failed: int = 0
    interrupted: bool = False
    mode_facts: dict[str, dict[str, str]] = field(default_factory=dict)
    cluster_runs: dict[str, str] = field(default_factory=dict)  # mode label -> its run name
    cluster_errors: dict[str, str] = field(default_factory=dict)  # failed build or teardown
    walks: dict[str, list[str]] = field(default_factory=dict)  # mode label -> walk stems
    walk_notes: dict[str, list[str]] = field(default_factory=dict)  # traces that failed


@dataclass
class Sitting:
    """One mode's cluster while its cases run: which path it is on and its client/server
    pairs by placement."""

    cluster: Any
    path: str | None = None
    pairs: dict[str, tuple[Any, Any]] = field(default_factory=dict)


class Runner:
    def __init__(
        self,
        spec: ExperimentSpec,
        store: RunStore,
        *,
        cluster_factory: ClusterFactory = real_cluster_factory,
        sampler_factory: SamplerFactory = real_sampler_factory,
        workloads: Mapping[str, WorkloadFunction] = WORKLOADS,
        paths: PathControl | None = None,
        show_progress: bool = True,
        tracer: Tracer = real_tracer,
    ) -> None:
        self.spec = spec
        self.store = store
        self.cluster_factory = cluster_factory
        self.sampler_factory = sampler_factory
        self.workloads = workloads
        self.paths: PathControl = paths or ClusterPaths()
        self.show_progress = show_progress
        self.tracer = tracer
        self.outcome = RunOutcome()
        self.context = {
            "experiment": spec.name,
            "run_id": store.run_id,
            "topology": spec.topology.as_argument(),
            "pinning": spec.pinning,
        }

    def run(self) -> RunOutcome:
        """Run every mode's cases; returns (rather than raises) on Ctrl-C, marked interrupted."""
        plan = {mode.label: mode_cases(self.spec, mode) for mode in self.spec.modes}
        total = sum(mode_seconds(c) for c in plan.values())
        cases = sum(len(c) for c in plan.values())
        with RunProgress(total, cases, enabled=self.show_progress) as progress:
            try:
                for mode in self.spec.modes:
                    self._run_mode(mode, plan[mode.label], progress)
            except KeyboardInterrupt:
                self.outcome.interrupted = True
        return self.outcome

    def _run_mode(self, mode: ModeSpec, cases: list[Case], progress: RunProgress) -> None:
        progress.describe(f"{mode.label}: building the cluster")
        done = 0
        facts: dict[str, str] = {}
        paths = self.spec.mode_paths(mode)
        topology = self.paths.topology(self.context["topology"], paths)
        try:
            with self.cluster_factory(
                topology, mode=mode.mode, mode_options=mode.options
            ) as cluster:
                facts = dict(cluster.facts())
                # the cluster's own run name: what `testbed clean` and leak checks look for
                self.outcome.cluster_runs[mode.label] = str(getattr(cluster, "run", ""))
                facts.update(self.paths.facts(cluster))
                self.outcome.mode_facts[mode.label] = facts
                progress.advance(CLUSTER_BUILD_SECONDS, cases=0)
                sitting = Sitting(cluster)
                if self.spec.trace:
                    progress.describe(f"{mode.label}: tracing one connection per placement")
                    self._trace_walks(mode, sitting, paths)
                for case in cases:
                    progress.describe(case.describe())
                    if case.path != sitting.path:
                        progress.advance(PATH_SWITCH_SECONDS, cases=0)
                    status = self._run_case(sitting, case, facts)
                    done += 1
                    progress.advance(case_seconds(case), cases=1, status=status)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # the cluster failed to build or to tear down
            error = f"cluster ({mode.label}): {type(exc).__name__}: {exc}"
            self.outcome.cluster_errors[mode.label] = error
            self._record_failed(cases[done:], facts, error)
            left = cases[done:]
            progress.advance(sum(map(case_seconds, left)), cases=len(left), status=error)

    def _trace_walks(self, mode: ModeSpec, sitting: Sitting, paths: Sequence[str]) -> None:
        """The report's walks of this mode. Before the first measured case, on purpose: the
        trace's connections, listeners and path switches then cannot disturb a measurement
        (the first case switches to its own path itself, sitting.path stays unset)."""
        cluster = sitting.cluster
        found = trace_mode_walks(
            cluster,
            mode.label,
            self.store.path,
            waypoint="waypoint" in paths,
            switch=lambda path, servers: self.paths.switch(cluster, path, servers),
            destination=lambda path, server: self.paths.destination(cluster, path, server),
            tracer=self.tracer,
        )
        self.outcome.walks[mode.label] = found.stems
        self.outcome.walk_notes[mode.label] = found.notes

    def _pairs(self, sitting: Sitting) -> dict[str, tuple[Any, Any]]:
        """Client and server pods of every placement of the spec."""
        if not sitting.pairs:
            for placement in self.spec.placements:
                client, server = sitting.cluster.pair(placement)
                sitting.pairs[placement] = (client, server)
        return sitting.pairs

    def _switch_path(self, sitting: Sitting, path: str) -> None:
        if sitting.path == path:
            return
        sitting.path = None  # a switch that fails is tried again by the next case
        servers = list({id(s): s for _, s in self._pairs(sitting).values()}.values())
        self.paths.switch(sitting.cluster, path, servers)
        sitting.path = path

    def _run_case(self, sitting: Sitting, case: Case, facts: dict[str, str]) -> str:
        """Run and record one case; returns its status (ok, failed)."""
        base = case_row(case, self.context, facts, utc_now())
        raw_dir = self.store.case_dir(case.case_id)
        try:
            self._switch_path(sitting, case.path)
            client, server = self._pairs(sitting)[case.placement]
            server = self.paths.destination(sitting.cluster, case.path, server)
            client, server = apply_pinning(self.spec.pinning, client, server)
            measured = self._measure(sitting, client, server, case, raw_dir)
        except KeyboardInterrupt:
            self.store.append_rows([failed_row(base, "interrupted", "interrupted by the user")])
            raise
        except Exception as exc:
            (raw_dir / "error.txt").write_text(traceback.format_exc())
            self.store.append_rows([failed_row(base, "failed", f"{type(exc).__name__}: {exc}")])
            self.outcome.cases_failed += 1
            return "failed"
        self.store.append_rows(measurement_rows(base, measured))
        self.outcome.cases_ok += 1
        return "ok"

    def _measure(
        self, sitting: Sitting, client: Any, server: Any, case: Case, raw_dir: Path
    ) -> list[MeasurementLike]:
        """The workload's rows plus CPU and memory of the proxies and of the machine."""
        workload = self.workloads[case.workload]
        if separate_warmup(case):
            workload(client, server, replace(case, duration=case.warmup), None)
        pids = sitting.cluster.proxy_pids()
        with self.sampler_factory(pids, self.spec.sample_interval) as sampler:
            measured = list(workload(client, server, case, raw_dir))
        return [*measured, *sampler.measurements()]

    def _record_failed(self, cases: list[Case], facts: dict[str, str], error: str) -> None:
        started = utc_now()
        rows = [
            failed_row(case_row(c, self.context, facts, started), "failed", error) for c in cases
        ]
        self.store.append_rows(rows)
        self.outcome.cases_failed += len(cases)
