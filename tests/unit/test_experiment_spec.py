from __future__ import annotations

from pathlib import Path

import pytest
from test_experiment_fakes import SMALL_SPEC, write_spec

from testbed.experiment.cases import estimated_seconds, mode_cases, worst_case_seconds
from testbed.experiment.spec import DATA_PATHS, SpecError, load_spec
from testbed.redirect import available_modes

# Every mode the design knows (docs/architecture.md), whatever this machine has.
ALL_MODES = ["none", "sidecar", "inpod", "legacy", "ebpf"]

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def spec_error(tmp_path: Path, text: str, **kwargs: object) -> str:
    path = write_spec(tmp_path, text, name="bad.yaml")
    with pytest.raises(SpecError) as caught:
        load_spec(path, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert str(path) in message
    return message


def test_small_spec_loads_with_shorthands_and_defaults(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path))
    assert spec.topology.as_argument() == "two_nodes"
    assert [mode.label for mode in spec.modes] == ["none", "inpod"]
    assert spec.sweeps.qps == [1000]
    assert spec.pinning == "none"


def test_topology_parameters_make_the_load_topology_argument(tmp_path: Path) -> None:
    text = SMALL_SPEC.replace(
        "topology: two_nodes", "topology: {name: multi_node, params: {nodes: 3, pods: 10}}"
    )
    spec = load_spec(write_spec(tmp_path, text))
    assert spec.topology.as_argument() == "multi_node,nodes=3,pods=10"


def test_unknown_mode_names_the_field_and_the_choices(tmp_path: Path) -> None:
    message = spec_error(tmp_path, SMALL_SPEC.replace("[none, inpod]", "[none, bogus]"))
    assert "modes[1].mode" in message
    assert "unknown mode 'bogus'" in message
    assert "none, sidecar, inpod, legacy, ebpf" in message


def test_unknown_workload_names_the_field(tmp_path: Path) -> None:
    message = spec_error(tmp_path, SMALL_SPEC.replace("[tcp_stream]", "[tcp_strem]"))
    assert "workloads[0]" in message
    assert "'tcp_stream'" in message and "tcp_strem" in message


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    message = spec_error(tmp_path, SMALL_SPEC.replace("repetitions: 2", "repetitions: three"))
    assert "repetitions: Input should be a valid integer" in message


def test_negative_duration_names_the_field(tmp_path: Path) -> None:
    message = spec_error(tmp_path, SMALL_SPEC.replace("duration: 2", "duration: -5"))
    assert "duration: Input should be greater than 0 (got -5)" in message


def test_fractional_seconds_are_rejected(tmp_path: Path) -> None:
    message = spec_error(tmp_path, SMALL_SPEC.replace("warmup: 1", "warmup: 0.5"))
    assert "warmup: Input should be a valid integer" in message


def test_misspelt_field_is_rejected(tmp_path: Path) -> None:
    message = spec_error(tmp_path, SMALL_SPEC + "repetition: 3\n")
    assert "repetition: Extra inputs are not permitted" in message


def test_missing_field_is_named(tmp_path: Path) -> None:
    message = spec_error(tmp_path, SMALL_SPEC.replace("placements: [same-node]\n", ""))
    assert "placements: Field required" in message


def test_negative_sweep_value_names_its_index(tmp_path: Path) -> None:
    message = spec_error(tmp_path, SMALL_SPEC + "sweeps: {connections: [1, -4]}\n")
    assert "sweeps.connections[1]" in message


def test_repeated_mode_needs_a_label(tmp_path: Path) -> None:
    message = spec_error(tmp_path, SMALL_SPEC.replace("[none, inpod]", "[inpod, inpod]"))
    assert "labels must be unique" in message
    nft = "{mode: inpod, label: inpod-nft, options: {inpod_variant: nftables}}"
    relabelled = SMALL_SPEC.replace("[none, inpod]", f"[inpod, {nft}]")
    spec = load_spec(write_spec(tmp_path, relabelled))
    assert spec.modes[1].options == {"inpod_variant": "nftables"}


def test_bad_mode_option_names_the_mode_and_the_option(tmp_path: Path) -> None:
    bad = SMALL_SPEC.replace("[none, inpod]", "[none, {mode: inpod, options: {backend: nft}}]")
    message = spec_error(tmp_path, bad)
    assert "modes[1]: options: mode inpod: unknown option 'backend'" in message


def test_unavailable_mode_is_a_spec_error(tmp_path: Path) -> None:
    message = spec_error(tmp_path, SMALL_SPEC, available_modes=lambda: ["none"])
    assert "modes[1]: mode 'inpod' is not available on this machine" in message


def test_modes_all_takes_the_available_modes(tmp_path: Path) -> None:
    path = write_spec(tmp_path, SMALL_SPEC.replace("[none, inpod]", "all"))
    spec = load_spec(path, available_modes=lambda: ["none", "sidecar"])
    assert [mode.mode for mode in spec.modes] == ["none", "sidecar"]


def test_yaml_that_is_not_a_mapping_is_reported(tmp_path: Path) -> None:
    assert "expected a mapping" in spec_error(tmp_path, "- just\n- a list\n")
    assert "not valid YAML" in spec_error(tmp_path, "name: [unclosed\n")


def test_default_spec_covers_the_issue_and_fits_in_15_minutes() -> None:
    spec = load_spec(EXPERIMENTS / "default.yaml", available_modes=available_modes)
    assert [mode.mode for mode in spec.modes] == available_modes()
    assert set(spec.placements) == {"same-node", "cross-node"}
    assert {"tcp_stream", "tcp_rr", "tcp_crr", "http_fixed_qps"} <= set(spec.workloads)
    assert {p for mode in spec.modes for p in spec.mode_paths(mode)} == set(DATA_PATHS)
    assert spec.first_repetitions >= 2
    assert spec.peers == ["native"]
    assert worst_case_seconds(spec) < 15 * 60  # the budget for extra repetitions included
    assert "15 minutes" in (EXPERIMENTS / "default.yaml").read_text()


def test_breakdown_and_published_specs_load_and_state_their_budget() -> None:
    for name in ("breakdown", "istio_published"):
        path = EXPERIMENTS / f"{name}.yaml"
        spec = load_spec(path, available_modes=lambda: ALL_MODES)
        assert "Budget:" in path.read_text()
        assert estimated_seconds(spec) > 0
    published = load_spec(EXPERIMENTS / "istio_published.yaml", available_modes=lambda: ALL_MODES)
    assert published.sweeps.connections == [1, 2, 4, 8, 16, 32, 64]
    assert published.http_payload == 1024 and published.sweeps.qps == [1000]


def test_baseline_spec_is_mode_none_throughput_and_latency() -> None:
    spec = load_spec(EXPERIMENTS / "baseline.yaml", available_modes=lambda: ["none"])
    assert [mode.mode for mode in spec.modes] == ["none"]
    assert set(spec.placements) == {"same-node", "cross-node"}
    assert set(spec.workloads) == {"tcp_stream", "tcp_rr"}
    assert len(mode_cases(spec, spec.modes[0])) == 2 * 2 * 3


def test_unknown_path_is_one_line_naming_the_field_and_the_choices(tmp_path: Path) -> None:
    message = spec_error(tmp_path, SMALL_SPEC + "paths: [direct, tunnel]\n")
    assert "\n" not in message
    assert "paths[1]" in message and "'tunnel'" in message
    assert "'capture'" in message and "'waypoint'" in message


def test_waypoint_path_for_a_mode_without_l7_is_one_line(tmp_path: Path) -> None:
    text = SMALL_SPEC.replace("[none, inpod]", "[none, sidecar]") + "paths: [hbone, waypoint]\n"
    message = spec_error(tmp_path, text)
    assert "\n" not in message
    assert "waypoint" in message and "'sidecar'" in message and "inpod" in message


def test_a_mode_may_leave_the_waypoint_out_with_its_own_paths(tmp_path: Path) -> None:
    text = SMALL_SPEC.replace("[none, inpod]", "[none, {mode: sidecar, paths: [capture]}]")
    spec = load_spec(write_spec(tmp_path, text + "paths: [direct, hbone, waypoint]\n"))
    assert [spec.mode_paths(mode) for mode in spec.modes] == [["direct"], ["capture"]]


def test_modes_all_leaves_the_waypoint_to_the_modes_with_l7(tmp_path: Path) -> None:
    text = SMALL_SPEC.replace("[none, inpod]", "all") + "paths: [direct, capture, waypoint]\n"
    spec = load_spec(write_spec(tmp_path, text), available_modes=lambda: ALL_MODES)
    paths = {mode.mode: spec.mode_paths(mode) for mode in spec.modes}
    assert paths["inpod"] == ["capture", "waypoint"]
    assert paths["sidecar"] == ["capture"]
    assert paths["none"] == ["direct"]


def test_a_meshed_mode_needs_more_than_direct(tmp_path: Path) -> None:
    message = spec_error(tmp_path, SMALL_SPEC + "paths: [direct]\n")
    assert "modes[1]" not in message and "'inpod'" in message and "\n" not in message


def test_message_sizes_stay_within_64_kib(tmp_path: Path) -> None:
    message = spec_error(tmp_path, SMALL_SPEC + "sweeps: {msg_sizes: [64, 65537]}\n")
    assert "sweeps.msg_sizes[1]" in message and "65536" in message


def test_repetitions_auto_takes_a_shorthand_and_durations(tmp_path: Path) -> None:
    spec = load_spec(
        write_spec(tmp_path, SMALL_SPEC.replace("repetitions: 2", "repetitions: auto"))
    )
    assert spec.auto is not None and (spec.auto.min, spec.auto.max) == (3, 10)
    assert spec.first_repetitions == 3
    text = SMALL_SPEC.replace(
        "repetitions: 2", "repetitions: {auto: {min: 4, max: 8, cv: 0.05, budget: 90s}}"
    )
    auto = load_spec(write_spec(tmp_path, text)).auto
    assert auto is not None and (auto.min, auto.max, auto.cv, auto.budget) == (4, 8, 0.05, 90.0)
    assert load_spec(write_spec(tmp_path, text.replace("90s", "2m"))).auto.budget == 120.0  # type: ignore[union-attr]


def test_estimate_with_auto_adds_the_budget_at_worst(tmp_path: Path) -> None:
    text = SMALL_SPEC.replace("repetitions: 2", "repetitions: {auto: {min: 2, budget: 5m}}")
    spec = load_spec(write_spec(tmp_path, text))
    assert worst_case_seconds(spec) == pytest.approx(estimated_seconds(spec) + 300)
    fixed = load_spec(write_spec(tmp_path))
    assert estimated_seconds(fixed) == estimated_seconds(spec)  # min 2 == repetitions 2


@pytest.mark.parametrize(
    ("repetitions", "expected"),
    [
        ("{auto: {min: 5, max: 3}}", "repetitions.auto: max (3) must be at least min (5)"),
        ("{auto: {min: 3, budget: soon}}", "repetitions.auto.budget: expected seconds or a"),
        ("{auto: {min: 1}}", "repetitions.auto.min: Input should be greater than or equal to 2"),
        ("{auto: {mni: 3}}", "repetitions.auto.mni: Extra inputs are not permitted"),
        ("{every: 3}", "repetitions.auto: expected a whole number, 'auto' or {auto:"),
        ("0", "repetitions: Input should be greater than 0"),
    ],
)
def test_bad_repetitions_name_the_file_and_field(
    tmp_path: Path, repetitions: str, expected: str
) -> None:
    message = spec_error(
        tmp_path, SMALL_SPEC.replace("repetitions: 2", f"repetitions: {repetitions}")
    )
    assert expected in message and "\n" not in message


def test_unknown_peer_names_the_field(tmp_path: Path) -> None:
    message = spec_error(tmp_path, SMALL_SPEC + "peers: [envoy]\n")
    assert "peers[0]: Input should be 'native'" in message
