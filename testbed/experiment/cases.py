"""The case matrix of a spec: one Case per measured run of one workload."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any, get_args

from testbed.experiment.spec import ExperimentSpec, ModeSpec, Peer

# Building a cluster and starting its proxies, and each workload's start and stop of its
# tools on top of the seconds it measures (sockperf takes ~2.4 s more than asked), as
# measured on a 2-vCPU VM: used only for the ETA and the budget check of a spec.
CLUSTER_BUILD_SECONDS = 10.0
RUN_OVERHEAD_SECONDS = {
    "tcp_stream": 0.6,
    "tcp_rr": 2.5,
    "tcp_crr": 1.5,
    "http_fixed_qps": 1.5,
    "http_crr": 1.5,
}
# Enrolling or unenrolling the servers, or attaching a waypoint: a config push that every
# ztunnel loads (a sidecar start for mode sidecar).
PATH_SWITCH_SECONDS = 1.5
# Workloads that warm up inside their measured run (on the very connections they measure),
# so the runner does not run them a separate time first.
SELF_WARMING = frozenset({"http_fixed_qps", "http_crr"})
# A peer's cases carry the peer's name as their path (and mode label).
PEER_PATHS: frozenset[str] = frozenset(get_args(Peer))


@dataclass(frozen=True)
class Case:
    mode: str  # the mode's label in the spec (unique within a run)
    placement: str
    workload: str
    repetition: int  # 1-based
    duration: int
    warmup: int
    msg_size: int | None = None
    parallel: int | None = None
    connections: int | None = None
    qps: int | None = None
    payload: int | None = None
    path: str = "hbone"  # direct | capture | hbone | waypoint | native (the peer)

    @property
    def case_id(self) -> str:
        """A file-name-safe name, unique within a run."""
        return f"{self.series_id}-r{self.repetition}"

    @property
    def series_id(self) -> str:
        """The case without its repetition: the name its repetitions share."""
        swept = [
            f"{name}{value}"
            for name, value in (
                ("m", self.msg_size),
                ("p", self.parallel),
                ("c", self.connections),
                ("q", self.qps),
            )
            if value is not None
        ]
        return "-".join([self.mode, self.path, self.placement, self.workload, *swept])

    def parameters(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        swept = {
            key: value
            for key, value in self.parameters().items()
            if key in ("msg_size", "parallel", "connections", "qps") and value is not None
        }
        params = " ".join(f"{key}={value}" for key, value in swept.items())
        # a peer's path is its own name: said once
        series = self.mode if self.path == self.mode else f"{self.mode} {self.path}"
        where = f"{series} {self.placement}"
        return f"{where} {self.workload} {params} rep {self.repetition}"


def _workload_variants(spec: ExperimentSpec, workload: str) -> list[dict[str, int]]:
    """The sweep axes that apply to a workload, as keyword sets for Case."""
    sweeps = spec.sweeps
    if workload == "tcp_stream":
        return [{"parallel": streams} for streams in sweeps.parallel]
    if workload in ("tcp_rr", "tcp_crr"):
        return [{"msg_size": size} for size in sweeps.msg_sizes]
    return [  # http_fixed_qps, http_crr
        {"connections": connections, "qps": rate, "payload": spec.http_payload}
        for connections, rate in itertools.product(sweeps.connections, sweeps.qps)
    ]


def mode_cases(spec: ExperimentSpec, mode: ModeSpec) -> list[Case]:
    """Every case of one mode; repetitions outermost so a slow drift spreads over all cases,
    then paths, so that the cluster switches path once per path and repetition."""
    return _cases(spec, [(mode.label, path) for path in spec.mode_paths(mode)])


def sitting_cases(spec: ExperimentSpec, mode: ModeSpec) -> list[Case]:
    """What runs on one mode's cluster: its cases and, on mode none's cluster, the peers'
    (labelled and pathed by the peer's name), interleaved per repetition (none, native,
    none, native, ...) as `testbed bench` does, so both see the same machine load."""
    series = [(mode.label, path) for path in spec.mode_paths(mode)]
    if mode.mode == "none":
        series += [(peer, peer) for peer in spec.peers]
    return _cases(spec, series)


def _cases(spec: ExperimentSpec, series: list[tuple[str, str]]) -> list[Case]:
    return [
        Case(
            mode=label,
            path=path,
            placement=placement,
            workload=workload,
            repetition=repetition,
            duration=spec.duration,
            warmup=spec.warmup,
            **variant,
        )
        for repetition in range(1, spec.first_repetitions + 1)
        for label, path in series
        for placement in spec.placements
        for workload in spec.workloads
        for variant in _workload_variants(spec, workload)
    ]


def separate_warmup(case: Case) -> bool:
    return case.warmup > 0 and case.workload not in SELF_WARMING


def case_seconds(case: Case) -> float:
    runs = 2 if separate_warmup(case) else 1
    return case.duration + case.warmup + runs * RUN_OVERHEAD_SECONDS[case.workload]


def station(case: Case) -> tuple[str, str]:
    """What the cluster must be set up for: the path, and for a peer also the placement
    (the peer's tunnel runs between the client's and the server's node)."""
    return case.path, (case.placement if case.path in PEER_PATHS else "")


def path_switches(cases: list[Case]) -> int:
    """How often the cluster changes path (or a peer's tunnel) running `cases` in order
    (the first set-up too)."""
    return sum(
        1
        for index, case in enumerate(cases)
        if index == 0 or station(cases[index - 1]) != station(case)
    )


def mode_seconds(cases: list[Case]) -> float:
    """One mode's cluster build, path switches and cases."""
    switching = PATH_SWITCH_SECONDS * path_switches(cases)
    return CLUSTER_BUILD_SECONDS + switching + sum(map(case_seconds, cases))


def estimated_seconds(spec: ExperimentSpec) -> float:
    """How long a run of the spec should take, cluster builds and path switches included;
    with `repetitions: auto`, the minimum repetitions (extra ones take at most the budget,
    see worst_case_seconds)."""
    return sum(mode_seconds(sitting_cases(spec, mode)) for mode in spec.modes)


def worst_case_seconds(spec: ExperimentSpec) -> float:
    """estimated_seconds plus the whole budget for extra repetitions."""
    auto = spec.auto
    return estimated_seconds(spec) + (auto.budget if auto else 0.0)
