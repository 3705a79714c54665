"""The matrix runner: a fresh cluster per mode, every case with its warm-up, rows as it goes.

A case that fails is recorded with its error and the run goes on; a cluster that cannot
be built fails all of its mode's cases. Each case's repetitions form a series whose
steadiness (testbed.experiment.steadiness) the run records; with `repetitions: auto`, a
mode's series that are not steady after the minimum get extra repetitions, one per series
and round, while the mode's share of the budget lasts. Peers (the native mTLS tunnel) run
on mode none's cluster, a tunnel per placement, started when their cases begin.

Ctrl-C (KeyboardInterrupt) ends the run after recording the interrupted case; the
cluster's context manager tears it down, and the caller finalizes the store with whatever
was measured.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from testbed.experiment.cases import (
    CLUSTER_BUILD_SECONDS,
    PATH_SWITCH_SECONDS,
    PEER_PATHS,
    Case,
    case_seconds,
    mode_seconds,
    separate_warmup,
    sitting_cases,
    station,
)
from testbed.experiment.paths import ClusterPaths, ServiceTarget
from testbed.experiment.peers import PeerEndpoint, PeerFactory, real_peer_factory
from testbed.experiment.pinning import apply_pinning
from testbed.experiment.progress import RunProgress
from testbed.experiment.rows import case_row, failed_row, measurement_rows
from testbed.experiment.spec import ExperimentSpec, ModeSpec
from testbed.experiment.steadiness import (
    DEFAULT_MAX_CV,
    HEADLINE_METRIC,
    StopReason,
    Verdict,
    judge,
    next_step,
)
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
class Series:
    """One case's repetitions: the headline figure of each measured one, every case_id."""

    template: Case
    values: list[float] = field(default_factory=list)
    case_ids: list[str] = field(default_factory=list)
    failed: bool = False
    stop: StopReason | None = None

    def verdict(self, max_cv: float) -> Verdict:
        return judge(self.values, max_cv)


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
    series: dict[str, Series] = field(default_factory=dict)  # Case.series_id -> its series
    extra_seconds: float = 0.0  # spent on extra repetitions (repetitions: auto)


@dataclass
class Sitting:
    """One mode's cluster while its cases run: which path it is on and its client/server
    pairs by placement."""

    cluster: Any
    path: str | None = None
    pairs: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    # the peer's tunnel now up: its (path, placement) and where the client reaches it
    peer_station: tuple[str, str] | None = None
    peer: PeerEndpoint | None = None
    peer_stack: ExitStack = field(default_factory=ExitStack)


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
        peer_factory: PeerFactory = real_peer_factory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.store = store
        self.cluster_factory = cluster_factory
        self.sampler_factory = sampler_factory
        self.workloads = workloads
        self.paths: PathControl = paths or ClusterPaths()
        self.show_progress = show_progress
        self.tracer = tracer
        self.peer_factory = peer_factory
        self.clock = clock
        self.outcome = RunOutcome()
        self.context = {
            "experiment": spec.name,
            "run_id": store.run_id,
            "topology": spec.topology.as_argument(),
            "pinning": spec.pinning,
        }

    def run(self) -> RunOutcome:
        """Run every mode's cases; returns (rather than raises) on Ctrl-C, marked interrupted."""
        plan = {mode.label: sitting_cases(self.spec, mode) for mode in self.spec.modes}
        total = sum(mode_seconds(c) for c in plan.values())
        cases = sum(len(c) for c in plan.values())
        with RunProgress(total, cases, enabled=self.show_progress) as progress:
            try:
                for index, mode in enumerate(self.spec.modes):
                    self._run_mode(mode, plan[mode.label], progress, len(plan) - index)
            except KeyboardInterrupt:
                self.outcome.interrupted = True
        self._close_series()
        return self.outcome

    @property
    def max_cv(self) -> float:
        auto = self.spec.auto
        return auto.cv if auto else DEFAULT_MAX_CV

    def _close_series(self) -> None:
        """Why each series ended, where the run did not say: a fixed count, or Ctrl-C."""
        default: StopReason = "interrupted" if self.outcome.interrupted else "fixed"
        for series in self.outcome.series.values():
            if series.stop is None:
                series.stop = "failed" if series.failed else default

    def _run_mode(
        self, mode: ModeSpec, cases: list[Case], progress: RunProgress, modes_left: int
    ) -> None:
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
                last: tuple[str, str] | None = None
                with sitting.peer_stack:  # a peer's tunnel ends before the cluster does
                    for case in cases:
                        progress.describe(case.describe())
                        if station(case) != last:  # as cases.path_switches counts them
                            progress.advance(PATH_SWITCH_SECONDS, cases=0)
                            last = station(case)
                        status = self._run_case(sitting, case, facts)
                        done += 1
                        progress.advance(case_seconds(case), cases=1, status=status)
                    self._extend(sitting, cases, facts, progress, modes_left)
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

    def _extend(
        self,
        sitting: Sitting,
        cases: list[Case],
        facts: dict[str, str],
        progress: RunProgress,
        modes_left: int,
    ) -> None:
        """repetitions: auto. Rounds over this mode's series in plan order, one more
        repetition for each series not yet ended, until every series has ended (steady, at
        max, or out of budget). The mode's allowance is an equal share of what the run's
        budget has left (unused time passes on to the modes after it)."""
        rule = self.spec.auto
        if rule is None:
            return
        allowance = (rule.budget - self.outcome.extra_seconds) / modes_left
        spent = 0.0
        open_series = [
            self.outcome.series[sid] for sid in dict.fromkeys(c.series_id for c in cases)
        ]
        while open_series:
            still = []
            for series in open_series:
                if series.failed:  # more repetitions would not make it steady
                    series.stop = "failed"
                    continue
                cost = case_seconds(series.template)
                series.stop = next_step(series.values, rule, allowance - spent, cost)
                if series.stop is None and len(series.case_ids) >= rule.max:
                    series.stop = "max"
                if series.stop is not None:
                    continue
                case = replace(series.template, repetition=len(series.case_ids) + 1)
                progress.extend(cost, cases=1)
                progress.describe(f"{case.describe()} (extra: {series.verdict(rule.cv).flag})")
                started = self.clock()
                status = self._run_case(sitting, case, facts)
                spent += self.clock() - started
                progress.advance(cost, cases=1, status=status)
                still.append(series)
            open_series = still
        self.outcome.extra_seconds += spent

    def _record_series(self, case: Case, measured: Sequence[MeasurementLike] | None) -> None:
        series = self.outcome.series.setdefault(case.series_id, Series(case))
        series.case_ids.append(case.case_id)
        headline = HEADLINE_METRIC.get(case.workload)
        values = [m.value for m in measured or () if m.metric == headline]
        if values:
            series.values.append(float(sum(values)))
        else:  # failed, or the tool gave no headline figure
            series.failed = True

    def _peer(self, sitting: Sitting, case: Case) -> PeerEndpoint:
        """The peer's tunnel for this case's placement, started if another one is up."""
        wanted = station(case)
        if sitting.peer is None or sitting.peer_station != wanted:
            sitting.peer_stack.close()
            sitting.peer, sitting.peer_station = None, None
            client, server = self._pairs(sitting)[case.placement]
            opened = self.peer_factory(case.path, sitting.cluster, client, server)
            sitting.peer = sitting.peer_stack.enter_context(opened)
            sitting.peer_station = wanted
        return sitting.peer

    def _endpoints(self, sitting: Sitting, case: Case) -> tuple[Any, Any, dict[str, int]]:
        """Client, server as the workload addresses it, and the pids to sample."""
        client, server = self._pairs(sitting)[case.placement]
        if case.path in PEER_PATHS:
            peer = self._peer(sitting, case)
            return client, ServiceTarget(server, peer.address), dict(peer.pids)
        sitting.peer_stack.close()  # a peer's tunnel is down while the mode is measured
        sitting.peer, sitting.peer_station = None, None
        self._switch_path(sitting, case.path)
        server = self.paths.destination(sitting.cluster, case.path, server)
        return client, server, sitting.cluster.proxy_pids()

    def _run_case(self, sitting: Sitting, case: Case, facts: dict[str, str]) -> str:
        """Run and record one case; returns its status (ok, failed)."""
        base = case_row(case, self.context, facts, utc_now())
        raw_dir = self.store.case_dir(case.case_id)
        try:
            client, server, pids = self._endpoints(sitting, case)
            client, server = apply_pinning(self.spec.pinning, client, server)
            measured = self._measure(client, server, pids, case, raw_dir)
        except KeyboardInterrupt:
            self.store.append_rows([failed_row(base, "interrupted", "interrupted by the user")])
            raise
        except Exception as exc:
            (raw_dir / "error.txt").write_text(traceback.format_exc())
            self.store.append_rows([failed_row(base, "failed", f"{type(exc).__name__}: {exc}")])
            self.outcome.cases_failed += 1
            self._record_series(case, None)
            return "failed"
        self.store.append_rows(measurement_rows(base, measured))
        self.outcome.cases_ok += 1
        self._record_series(case, measured)
        return "ok"

    def _measure(
        self, client: Any, server: Any, pids: dict[str, int], case: Case, raw_dir: Path
    ) -> list[MeasurementLike]:
        """The workload's rows plus CPU and memory of the proxies and of the machine."""
        workload = self.workloads[case.workload]
        if separate_warmup(case):
            workload(client, server, replace(case, duration=case.warmup), None)
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
        for case in cases:
            self._record_series(case, None)

    def steadiness_columns(self) -> dict[str, dict[str, str]]:
        """case_id -> the steadiness and steadiness_stop columns of its rows."""
        columns: dict[str, dict[str, str]] = {}
        for series in self.outcome.series.values():
            flag = series.verdict(self.max_cv).flag
            for case_id in series.case_ids:
                # no stop yet: the runner itself crashed (metadata status "aborted")
                stop = series.stop or "interrupted"
                columns[case_id] = {"steadiness": flag, "steadiness_stop": stop}
        return columns

    def steadiness_metadata(self) -> dict[str, Any]:
        """The rule and every series' verdict, for metadata.json."""
        auto = self.spec.auto
        series = {}
        for sid, found in self.outcome.series.items():
            verdict = found.verdict(self.max_cv)
            series[sid] = {
                "flag": verdict.flag,
                "stop": found.stop or "interrupted",
                "n": verdict.n,
                "cv": verdict.cv,
                "gap_ratio": verdict.gap_ratio,
                "metric": HEADLINE_METRIC.get(found.template.workload),
            }
        return {
            "max_cv": self.max_cv,
            "auto": None if auto is None else vars(auto),
            "extra_seconds": round(self.outcome.extra_seconds, 1),
            "series": series,
        }
