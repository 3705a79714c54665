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
    Case,
    case_seconds,
    mode_cases,
    separate_warmup,
)
from testbed.experiment.pinning import apply_pinning
from testbed.experiment.progress import RunProgress
from testbed.experiment.rows import case_row, failed_row, measurement_rows
from testbed.experiment.spec import ExperimentSpec, ModeSpec
from testbed.experiment.store import RunStore
from testbed.experiment.workloads import WORKLOADS, MeasurementLike, WorkloadFunction


class ClusterLike(Protocol):
    def pair(self, placement: str) -> tuple[Any, Any]: ...

    def proxy_pids(self) -> dict[str, int]: ...

    def facts(self) -> dict[str, str]: ...


class SamplerLike(Protocol):
    def measurements(self) -> Sequence[MeasurementLike]: ...


ClusterFactory = Callable[..., AbstractContextManager[ClusterLike]]
SamplerFactory = Callable[[dict[str, int], float], AbstractContextManager[SamplerLike]]


def real_cluster_factory(
    topology: str, *, mode: str, mode_options: Mapping[str, Any]
) -> AbstractContextManager[ClusterLike]:
    from testbed.cluster.cluster import Cluster
    from testbed.redirect import create_mode

    return Cluster(topology, create_mode(mode, mode_options))


def real_sampler_factory(pids: dict[str, int], interval: float) -> AbstractContextManager[Any]:
    from testbed.measure.resources import ResourceSampler

    return ResourceSampler(pids, interval)


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


class Runner:
    def __init__(
        self,
        spec: ExperimentSpec,
        store: RunStore,
        *,
        cluster_factory: ClusterFactory = real_cluster_factory,
        sampler_factory: SamplerFactory = real_sampler_factory,
        workloads: Mapping[str, WorkloadFunction] = WORKLOADS,
        show_progress: bool = True,
    ) -> None:
        self.spec = spec
        self.store = store
        self.cluster_factory = cluster_factory
        self.sampler_factory = sampler_factory
        self.workloads = workloads
        self.show_progress = show_progress
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
        total = sum(CLUSTER_BUILD_SECONDS + sum(map(case_seconds, c)) for c in plan.values())
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
        try:
            with self.cluster_factory(
                self.context["topology"], mode=mode.mode, mode_options=mode.options
            ) as cluster:
                facts = dict(cluster.facts())
                self.outcome.mode_facts[mode.label] = facts
                # the cluster's own run name: what `testbed clean` and leak checks look for
                self.outcome.cluster_runs[mode.label] = str(getattr(cluster, "run", ""))
                progress.advance(CLUSTER_BUILD_SECONDS, cases=0)
                pairs: dict[str, tuple[Any, Any]] = {}
                for case in cases:
                    progress.describe(case.describe())
                    self._run_case(cluster, pairs, case, facts)
                    done += 1
                    progress.advance(case_seconds(case), cases=1)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # the cluster failed to build or to tear down
            error = f"cluster ({mode.label}): {type(exc).__name__}: {exc}"
            self.outcome.cluster_errors[mode.label] = error
            self._record_failed(cases[done:], facts, error)
            progress.advance(sum(map(case_seconds, cases[done:])), cases=len(cases) - done)

    def _run_case(
        self,
        cluster: ClusterLike,
        pairs: dict[str, tuple[Any, Any]],
        case: Case,
        facts: dict[str, str],
    ) -> None:
        base = case_row(case, self.context, facts, utc_now())
        raw_dir = self.store.case_dir(case.case_id)
        try:
            if case.placement not in pairs:
                client, server = cluster.pair(case.placement)
                pairs[case.placement] = apply_pinning(self.spec.pinning, client, server)
            measured = self._measure(cluster, *pairs[case.placement], case, raw_dir)
        except KeyboardInterrupt:
            self.store.append_rows([failed_row(base, "interrupted", "interrupted by the user")])
            raise
        except Exception as exc:
            (raw_dir / "error.txt").write_text(traceback.format_exc())
            self.store.append_rows([failed_row(base, "failed", f"{type(exc).__name__}: {exc}")])
            self.outcome.cases_failed += 1
            return
        self.store.append_rows(measurement_rows(base, measured))
        self.outcome.cases_ok += 1

    def _measure(
        self, cluster: ClusterLike, client: Any, server: Any, case: Case, raw_dir: Path
    ) -> list[MeasurementLike]:
        workload = self.workloads[case.workload]
        if separate_warmup(case):
            workload(client, server, replace(case, duration=case.warmup), None)
        pids = cluster.proxy_pids()
        if not pids:
            return list(workload(client, server, case, raw_dir))
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
