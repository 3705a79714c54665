from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
from test_experiment_fakes import (
    SMALL_SPEC,
    FakeClusterFactory,
    FakePeers,
    fake_runner,
    fake_stream,
    load_fake_spec,
)

from testbed.experiment.cases import Case
from testbed.experiment.pinning import PinnedHost, apply_pinning
from testbed.experiment.run import execute, run_experiment
from testbed.experiment.spec import SpecError
from testbed.experiment.store import RunStore
from testbed.results import COLUMNS, load


def run_fake(
    tmp_path: Path, text: str = SMALL_SPEC, **kwargs: Any
) -> tuple[Path, FakeClusterFactory]:
    spec_path, spec = load_fake_spec(tmp_path, text)
    store = RunStore.create(tmp_path / "results", spec.name)
    factory = kwargs.pop("factory", FakeClusterFactory())
    execute(spec_path, spec, store, fake_runner(spec, store, factory, **kwargs))
    return store.path, factory


def test_small_run_stores_tidy_rows_with_every_case_parameter(tmp_path: Path) -> None:
    run_dir, factory = run_fake(tmp_path)
    assert run_dir.name.endswith("-small") and (run_dir / "raw").is_dir()
    frame = load(run_dir)
    assert list(frame.columns[: len(COLUMNS)]) == list(COLUMNS)
    throughput = frame[frame["metric"] == "throughput"]
    assert len(throughput) == 2 * 2  # 2 modes x 2 repetitions
    assert set(throughput["mode"]) == {"none", "inpod"}
    assert set(throughput["repetition"]) == {1, 2}
    assert (throughput["parallel"] == 1).all() and throughput["msg_size"].isna().all()
    assert set(throughput["run_id"]) == {run_dir.name}
    assert (frame["status"] == "ok").all()
    # a fresh cluster per mode, torn down before the next one is built
    assert factory.log == ["build none", "teardown none", "build inpod", "teardown inpod"]


def test_cluster_facts_and_proxy_samples_become_columns(tmp_path: Path) -> None:
    frame = load(run_fake(tmp_path)[0])
    inpod = frame[frame["mode"] == "inpod"]
    assert set(inpod["tunnel"]) == {"vxlan"}
    assert set(inpod["fact_mode"]) == {"inpod"}  # a fact named like a column is prefixed
    proxy = inpod[inpod["metric"] == "rss_max_bytes"]
    assert len(proxy) == 2 and set(proxy["process"]) == {"ztunnel-node1"}
    assert (proxy["value"] > 0).all()
    assert not (frame[frame["mode"] == "none"]["metric"] == "rss_max_bytes").any()


def test_csv_and_parquet_hold_the_same_rows(tmp_path: Path) -> None:
    run_dir = run_fake(tmp_path)[0]
    from_parquet = load(run_dir / "results.parquet")
    from_csv = load(run_dir / "results.csv")
    assert from_csv.shape == from_parquet.shape
    assert list(from_csv["value"]) == pytest.approx(list(from_parquet["value"]), nan_ok=True)
    assert list(from_csv["repetition"]) == list(from_parquet["repetition"])


def test_raw_outputs_are_kept_per_case(tmp_path: Path) -> None:
    run_dir = run_fake(tmp_path)[0]
    raw = sorted(p.parent.name for p in (run_dir / "raw").glob("*/iperf3-client.json"))
    assert raw == [
        "inpod-hbone-same-node-tcp_stream-p1-r1",
        "inpod-hbone-same-node-tcp_stream-p1-r2",
        "none-direct-same-node-tcp_stream-p1-r1",
        "none-direct-same-node-tcp_stream-p1-r2",
    ]


def test_metadata_records_environment_pinning_and_fallbacks(tmp_path: Path) -> None:
    run_dir = run_fake(tmp_path)[0]
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["status"] == "complete"
    assert metadata["cases_ok"] == 4 and metadata["cases_failed"] == 0
    assert metadata["fallbacks"] == ["tunnel=vxlan"]
    assert metadata["modes"]["inpod"]["facts"]["tunnel"] == "vxlan"
    assert metadata["pinning"] == {"policy": "none"}
    environment = metadata["environment"]
    assert environment["kernel"] and environment["tools"]["python"].startswith("3.")
    assert set(environment["kernel_features"]) >= {"geneve", "vxlan", "ktls"}
    assert (run_dir / "spec.yaml").read_text().startswith("\nname: small")


def test_warmup_runs_before_each_measured_case(tmp_path: Path) -> None:
    calls: list[tuple[float, bool]] = []

    def recording(client: Any, server: Any, case: Case, raw_dir: Path | None) -> Any:
        calls.append((case.duration, raw_dir is None))
        return fake_stream(client, server, case, raw_dir)

    run_fake(tmp_path, workloads={"tcp_stream": recording})
    assert calls == [(1, True), (2, False)] * 4


def test_failing_case_is_recorded_and_the_rest_complete(tmp_path: Path) -> None:
    def flaky(client: Any, server: Any, case: Case, raw_dir: Path | None) -> Any:
        if case.mode == "none" and case.repetition == 1 and raw_dir is not None:
            raise RuntimeError("iperf3: unable to connect")
        return fake_stream(client, server, case, raw_dir)

    run_dir = run_fake(tmp_path, workloads={"tcp_stream": flaky})[0]
    frame = load(run_dir)
    failed = frame[frame["status"] == "failed"]
    assert list(failed["case_id"]) == ["none-direct-same-node-tcp_stream-p1-r1"]
    assert failed["error"].iloc[0] == "RuntimeError: iperf3: unable to connect"
    assert failed["metric"].isna().all()
    assert len(frame[frame["metric"] == "throughput"]) == 3
    assert (
        "unable to connect"
        in (run_dir / "raw" / failed["case_id"].iloc[0] / "error.txt").read_text()
    )


def test_cluster_that_fails_to_build_fails_its_cases_only(tmp_path: Path) -> None:
    run_dir = run_fake(tmp_path, factory=FakeClusterFactory(fail_modes=["none"]))[0]
    frame = load(run_dir)
    none = frame[frame["mode"] == "none"]
    assert len(none) == 2 and (none["status"] == "failed").all()
    assert none["error"].str.contains("no such kernel feature").all()
    assert (frame[frame["mode"] == "inpod"]["status"] == "ok").all()
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert "no such kernel feature" in metadata["modes"]["none"]["cluster_error"]


def test_ctrl_c_keeps_what_was_measured_and_tears_down(tmp_path: Path) -> None:
    def interrupted(client: Any, server: Any, case: Case, raw_dir: Path | None) -> Any:
        if case.mode == "inpod" and raw_dir is not None:
            raise KeyboardInterrupt
        return fake_stream(client, server, case, raw_dir)

    run_dir, factory = run_fake(tmp_path, workloads={"tcp_stream": interrupted})
    assert factory.log[-1] == "teardown inpod"
    frame = load(run_dir)
    assert len(frame[frame["metric"] == "throughput"]) == 2  # mode none, both repetitions
    assert list(frame[frame["status"] == "interrupted"]["case_id"]) == [
        "inpod-hbone-same-node-tcp_stream-p1-r1"
    ]
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["status"] == "interrupted" and metadata["cases_ok"] == 2


def test_split_pinning_prefixes_commands_with_taskset(tmp_path: Path) -> None:
    run_dir, factory = run_fake(tmp_path, SMALL_SPEC + "pinning: split\n")
    client = factory.clusters[0].pods[0]
    assert client.commands[0][:3] == ["taskset", "-c", "0"]
    assert set(load(run_dir)["pinning"]) == {"split"}
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["pinning"]["cpus"] == {"client": 0, "server": 1}


def test_pinned_host_keeps_the_pod_attributes() -> None:
    class Pod:
        ip = "10.0.0.1"

        def run(self, argv: list[str], **kwargs: Any) -> list[str]:
            return argv

        spawn = run

    client, server = apply_pinning("split", Pod(), Pod())
    assert isinstance(server, PinnedHost) and server.ip == "10.0.0.1"
    assert cast(Any, server.spawn(["sockperf", "server"], label="s")) == [
        "taskset",
        "-c",
        "1",
        "sockperf",
        "server",
    ]
    assert apply_pinning("none", client, server) == (client, server)


def test_crashed_runner_still_leaves_results_and_says_aborted(tmp_path: Path) -> None:
    def crashing(client: Any, server: Any, case: Case, raw_dir: Path | None) -> Any:
        if case.mode == "inpod":
            raise SystemExit(3)
        return fake_stream(client, server, case, raw_dir)

    with pytest.raises(SystemExit):
        run_fake(tmp_path, workloads={"tcp_stream": crashing})
    (run_dir,) = (tmp_path / "results").iterdir()
    assert json.loads((run_dir / "metadata.json").read_text())["status"] == "aborted"
    assert len(load(run_dir)) > 0


def test_unknown_topology_is_a_spec_error_before_anything_is_built(tmp_path: Path) -> None:
    spec_path = load_fake_spec(tmp_path, SMALL_SPEC.replace("two_nodes", "no_such_topology"))[0]
    with pytest.raises(SpecError, match=r"small\.yaml: topology: .*no_such_topology"):
        run_experiment(
            spec_path, results_dir=tmp_path / "results", available_modes=lambda: ["none", "inpod"]
        )
    assert not (tmp_path / "results").exists()


AUTO_SPEC = SMALL_SPEC.replace("modes: [none, inpod]", "modes: [none]").replace(
    "repetitions: 2", "repetitions: {auto: {min: 2, max: 4, cv: 0.10, budget: 5m}}"
)


def by_repetition(values: dict[int, float]) -> Any:
    """A tcp_stream whose throughput (Gbit/s) is given per repetition."""

    def workload(client: Any, server: Any, case: Case, raw_dir: Path | None) -> Any:
        rows = fake_stream(client, server, case, raw_dir)
        return [replace(rows[0], value=values[case.repetition] * 1e9)]

    return workload


def steadiness_of(run_dir: Path) -> tuple[list[int], set[str], set[str]]:
    rows = load(run_dir)
    throughput = rows[rows["metric"] == "throughput"]
    flags = set(throughput["steadiness"])
    stops = set(throughput["steadiness_stop"])
    return sorted(throughput["repetition"]), flags, stops


def test_fixed_repetitions_are_judged_and_stored(tmp_path: Path) -> None:
    run_dir = run_fake(tmp_path)[0]
    assert steadiness_of(run_dir)[1:] == ({"steady"}, {"fixed"})
    series = json.loads((run_dir / "metadata.json").read_text())["steadiness"]["series"]
    assert series["inpod-hbone-same-node-tcp_stream-p1"]["flag"] == "steady"
    assert series["inpod-hbone-same-node-tcp_stream-p1"]["metric"] == "throughput"


def test_auto_extends_a_case_until_its_spread_is_within_bounds(tmp_path: Path) -> None:
    workload = by_repetition({1: 10.0, 2: 12.0, 3: 10.5, 4: 10.2})  # CV 0.13, then 0.096
    run_dir = run_fake(tmp_path, AUTO_SPEC, workloads={"tcp_stream": workload})[0]
    assert steadiness_of(run_dir) == ([1, 2, 3], {"steady"}, {"steady"})
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["steadiness"]["auto"]["max"] == 4 and metadata["cases_ok"] == 3


def test_auto_stops_a_bimodal_case_at_max(tmp_path: Path) -> None:
    workload = by_repetition({1: 2.7, 2: 4.3, 3: 2.72, 4: 4.31})
    run_dir = run_fake(tmp_path, AUTO_SPEC, workloads={"tcp_stream": workload})[0]
    assert steadiness_of(run_dir) == ([1, 2, 3, 4], {"bimodal"}, {"max"})


def test_auto_stops_a_noisy_case_at_the_budget(tmp_path: Path) -> None:
    # one more 2 s repetition would take longer than the 1 s budget: none is begun
    spec = AUTO_SPEC.replace("budget: 5m", "budget: 1s")
    workload = by_repetition({1: 10.0, 2: 14.0})
    run_dir = run_fake(tmp_path, spec, workloads={"tcp_stream": workload})[0]
    assert steadiness_of(run_dir) == ([1, 2], {"noisy"}, {"budget"})


def test_a_failed_case_is_not_extended(tmp_path: Path) -> None:
    def failing(client: Any, server: Any, case: Case, raw_dir: Path | None) -> Any:
        raise RuntimeError("iperf3: unable to connect")

    run_dir = run_fake(tmp_path, AUTO_SPEC, workloads={"tcp_stream": failing})[0]
    frame = load(run_dir)
    assert sorted(frame["repetition"]) == [1, 2]
    assert set(frame["steadiness"]) == {"unknown"} and set(frame["steadiness_stop"]) == {"failed"}


PEER_SPEC = SMALL_SPEC.replace("placements: [same-node]", "placements: [same-node, cross-node]")
PEER_SPEC += "peers: [native]\n"


def test_the_native_peer_runs_on_mode_nones_cluster_interleaved(tmp_path: Path) -> None:
    peers = FakePeers()
    run_dir, factory = run_fake(tmp_path, PEER_SPEC, peers=peers)
    assert factory.log == ["build none", "teardown none", "build inpod", "teardown inpod"]
    # a tunnel per placement, up only while the peer's cases run, every repetition
    assert peers.log == [
        "start native node1->node1 on none", "stop native",
        "start native node1->node2 on none", "stop native",
    ] * 2  # fmt: skip
    frame = load(run_dir)
    native = frame[frame["mode"] == "native"]
    assert set(native["path"]) == {"native"} and set(native["status"]) == {"ok"}
    throughput = native[native["metric"] == "throughput"]
    assert sorted(throughput["placement"]) == ["cross-node"] * 2 + ["same-node"] * 2
    assert set(native[native["metric"] == "rss_max_bytes"]["process"]) == {"haproxy-client"}
    order = frame[frame["metric"] == "throughput"].drop_duplicates("case_id")
    assert list(order["mode"])[:4] == ["none", "none", "native", "native"]  # rep 1 of each
    assert list(order["repetition"])[:8] == [1, 1, 1, 1, 2, 2, 2, 2]
    client = factory.clusters[0].pods[0]
    assert ["iperf3", "-c", FakePeers.ADDRESS] in client.commands  # the tunnel's entry
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert "haproxy" in metadata["peers"]["native"]["what"]


def test_a_peer_without_mode_none_is_a_spec_error(tmp_path: Path) -> None:
    text = PEER_SPEC.replace("modes: [none, inpod]", "modes: [inpod]")
    with pytest.raises(SpecError, match=r"small\.yaml: invalid experiment spec: peers: .*none"):
        load_fake_spec(tmp_path, text)


def test_auto_budget_is_shared_by_the_modes_and_unused_time_passes_on(tmp_path: Path) -> None:
    spec = SMALL_SPEC.replace(
        "repetitions: 2", "repetitions: {auto: {min: 2, max: 10, budget: 20s}}"
    )
    ticks = iter(range(0, 10_000, 5))  # every extra repetition takes 5 s on this clock

    def noisy_inpod(client: Any, server: Any, case: Case, raw_dir: Path | None) -> Any:
        rows = fake_stream(client, server, case, raw_dir)  # none: 1 % apart, steady
        if case.mode == "inpod":
            return [replace(rows[0], value=(6e9, 9e9, 7e9)[case.repetition % 3])]
        return rows

    run_dir = run_fake(
        tmp_path, spec, workloads={"tcp_stream": noisy_inpod}, clock=lambda: next(ticks)
    )[0]
    frame = load(run_dir).query("metric == 'throughput'")
    reps = frame.groupby("mode")["repetition"].max().to_dict()
    # none needs no extra repetition, so inpod may use the whole 20 s: four 5-s extras
    assert reps == {"none": 2, "inpod": 6}
    assert set(frame.loc[frame["mode"] == "inpod", "steadiness_stop"]) == {"budget"}
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["steadiness"]["extra_seconds"] == 20
