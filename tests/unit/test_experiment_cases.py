from __future__ import annotations

from pathlib import Path

import pytest
from test_experiment_fakes import SMALL_SPEC, load_fake_spec

from testbed.experiment.cases import (
    CLUSTER_BUILD_SECONDS,
    PATH_SWITCH_SECONDS,
    RUN_OVERHEAD_SECONDS,
    estimated_seconds,
    mode_cases,
    path_switches,
    separate_warmup,
    sitting_cases,
)

SWEPT = SMALL_SPEC.replace("[tcp_stream]", "[tcp_stream, tcp_rr, http_fixed_qps]") + (
    "sweeps: {parallel: [1, 4], msg_sizes: [64, 1024], connections: [1, 8, 64], qps: [1000]}\n"
)


def test_each_workload_sweeps_its_own_axes(tmp_path: Path) -> None:
    spec = load_fake_spec(tmp_path, SWEPT)[1]
    cases = mode_cases(spec, spec.modes[1])
    by_workload = {w: [c for c in cases if c.workload == w] for w in spec.workloads}
    assert {c.parallel for c in by_workload["tcp_stream"]} == {1, 4}
    assert {c.msg_size for c in by_workload["tcp_rr"]} == {64, 1024}
    assert {(c.connections, c.qps) for c in by_workload["http_fixed_qps"]} == {
        (1, 1000),
        (8, 1000),
        (64, 1000),
    }
    assert all(c.payload == 1024 for c in by_workload["http_fixed_qps"])
    assert all(c.msg_size is None for c in by_workload["tcp_stream"])
    assert len(cases) == 2 * (2 + 2 + 3)  # repetitions x variants


def test_case_ids_are_unique_and_name_the_case(tmp_path: Path) -> None:
    spec = load_fake_spec(tmp_path, SWEPT)[1]
    cases = [case for mode in spec.modes for case in mode_cases(spec, mode)]
    assert len({case.case_id for case in cases}) == len(cases)
    assert "inpod-hbone-same-node-http_fixed_qps-c8-q1000-r2" in {case.case_id for case in cases}


def test_repetitions_are_the_outermost_loop(tmp_path: Path) -> None:
    spec = load_fake_spec(tmp_path, SWEPT)[1]
    repetitions = [case.repetition for case in mode_cases(spec, spec.modes[0])]
    assert repetitions == sorted(repetitions)


def test_estimate_counts_every_case_cluster_and_warmup_run(tmp_path: Path) -> None:
    spec = load_fake_spec(tmp_path)[1]
    per_case = spec.duration + spec.warmup + 2 * RUN_OVERHEAD_SECONDS["tcp_stream"]
    # one path per mode: one path set-up each
    overhead = CLUSTER_BUILD_SECONDS + PATH_SWITCH_SECONDS
    assert estimated_seconds(spec) == pytest.approx(2 * overhead + 4 * per_case)


PATHS_SPEC = """
name: paths
topology: two_nodes
modes: [none, inpod, {mode: sidecar, paths: [capture, hbone]}]
workloads: [tcp_rr]
paths: [direct, capture, hbone, waypoint]
placements: [same-node, cross-node]
repetitions: 2
warmup: 0
duration: 1
"""


def test_each_mode_runs_the_paths_that_apply_to_it(tmp_path: Path) -> None:
    spec = load_fake_spec(tmp_path, PATHS_SPEC)[1]
    runs = {mode.label: sorted({c.path for c in mode_cases(spec, mode)}) for mode in spec.modes}
    assert runs == {
        "none": ["direct"],
        "inpod": ["capture", "hbone", "waypoint"],
        "sidecar": ["capture", "hbone"],
    }


def test_a_mode_switches_path_once_per_path_and_repetition(tmp_path: Path) -> None:
    spec = load_fake_spec(tmp_path, PATHS_SPEC)[1]
    cases = mode_cases(spec, spec.modes[1])
    assert path_switches(cases) == 2 * 3
    order = [c.path for c in cases if c.repetition == 1]
    assert order == ["capture"] * 2 + ["hbone"] * 2 + ["waypoint"] * 2


def test_estimate_knows_paths(tmp_path: Path) -> None:
    spec = load_fake_spec(tmp_path, PATHS_SPEC)[1]
    case_time = spec.duration + RUN_OVERHEAD_SECONDS["tcp_rr"]  # no warm-up run
    cases = 2 * 2 * (1 + 3 + 2)  # repetitions x placements x paths of the three modes
    switches = 2 * (1 + 3 + 2) - 1  # none stays on direct: one set-up only
    expected = 3 * CLUSTER_BUILD_SECONDS + switches * PATH_SWITCH_SECONDS + cases * case_time
    assert estimated_seconds(spec) == pytest.approx(expected)


def test_http_warms_up_inside_its_measured_run(tmp_path: Path) -> None:
    spec = load_fake_spec(tmp_path, SWEPT)[1]
    cases = mode_cases(spec, spec.modes[0])
    assert {c.workload for c in cases if not separate_warmup(c)} == {"http_fixed_qps"}


def test_the_native_peer_rides_on_nones_cluster_and_costs_its_cases(tmp_path: Path) -> None:
    text = SMALL_SPEC.replace("[same-node]", "[same-node, cross-node]")
    spec = load_fake_spec(tmp_path, text + "peers: [native]\n")[1]
    none, inpod = spec.modes
    cases = sitting_cases(spec, none)
    assert [(c.mode, c.path, c.placement, c.repetition) for c in cases] == [
        (mode, path, placement, repetition)
        for repetition in (1, 2)
        for mode, path in (("none", "direct"), ("native", "native"))
        for placement in ("same-node", "cross-node")
    ]
    assert sitting_cases(spec, inpod) == mode_cases(spec, inpod)  # the peer is none's only
    assert path_switches(cases) == 2 * 3  # per repetition: direct, a tunnel per placement
    assert cases[-1].describe() == "native cross-node tcp_stream parallel=1 rep 2"
    assert cases[-1].series_id == "native-native-cross-node-tcp_stream-p1"
    without = load_fake_spec(tmp_path, text)[1]
    assert estimated_seconds(spec) > estimated_seconds(without)
