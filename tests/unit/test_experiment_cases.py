from __future__ import annotations

from pathlib import Path

from test_experiment_fakes import SMALL_SPEC, load_fake_spec

from testbed.experiment.cases import (
    CLUSTER_BUILD_SECONDS,
    RUN_OVERHEAD_SECONDS,
    estimated_seconds,
    mode_cases,
    separate_warmup,
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
    assert "inpod-same-node-http_fixed_qps-c8-q1000-r2" in {case.case_id for case in cases}


def test_repetitions_are_the_outermost_loop(tmp_path: Path) -> None:
    spec = load_fake_spec(tmp_path, SWEPT)[1]
    repetitions = [case.repetition for case in mode_cases(spec, spec.modes[0])]
    assert repetitions == sorted(repetitions)


def test_estimate_counts_every_case_cluster_and_warmup_run(tmp_path: Path) -> None:
    spec = load_fake_spec(tmp_path)[1]
    per_case = spec.duration + spec.warmup + 2 * RUN_OVERHEAD_SECONDS["tcp_stream"]
    assert estimated_seconds(spec) == 2 * CLUSTER_BUILD_SECONDS + 4 * per_case


def test_http_warms_up_inside_its_measured_run(tmp_path: Path) -> None:
    spec = load_fake_spec(tmp_path, SWEPT)[1]
    cases = mode_cases(spec, spec.modes[0])
    assert {c.workload for c in cases if not separate_warmup(c)} == {"http_fixed_qps"}
