from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_experiment_fakes import (
    SMALL_SPEC,
    FakeClusterFactory,
    fake_runner,
    fake_stream,
    load_fake_spec,
)

from testbed.experiment.analysis import proxy_cpu_per_1000_rps
from testbed.experiment.cases import Case
from testbed.experiment.report import write_report
from testbed.experiment.run import execute
from testbed.experiment.store import RunStore
from testbed.results import frame_from_rows

FULL_SPEC = (
    SMALL_SPEC.replace("[tcp_stream]", "[tcp_stream, tcp_rr, http_fixed_qps]").replace(
        "[same-node]", "[same-node, cross-node]"
    )
    + "sweeps: {connections: [1, 4, 16]}\n"
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    spec_path, spec = load_fake_spec(folder, FULL_SPEC)
    store = RunStore.create(folder / "results", spec.name)
    execute(spec_path, spec, store, fake_runner(spec, store, FakeClusterFactory()))
    return write_report(store.path)


def test_report_links_every_figure_and_the_figures_are_pngs(report_path: Path) -> None:
    text = report_path.read_text()
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert set(images) >= {
        "figures/throughput.png",
        "figures/latency_tcp_rr.png",
        "figures/http_same-node_1000qps.png",
        "figures/http_cross-node_1000qps.png",
        "figures/proxy_cpu.png",
        "figures/proxy_memory.png",
    }
    for image in images:
        data = (report_path.parent / image).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_report_tables_give_medians_spread_and_ratio_to_none(report_path: Path) -> None:
    text = report_path.read_text()
    # fake throughput: none 10 Gbit/s x (1.01, 1.02), inpod 6.6 Gbit/s x (1.01, 1.02)
    assert (
        "| none | same-node | tcp_stream | parallel=1 | throughput | 10.15 | 10.1-10.2 | 2 | 1 |"
        in text
    )
    inpod = "| inpod | same-node | tcp_stream | parallel=1 | throughput | 6.699 | 6.666-6.732 |"
    assert inpod + " 2 | 0.66 |" in text
    assert "ratio to none" in text


def test_report_header_names_the_environment(report_path: Path) -> None:
    text = report_path.read_text()
    assert text.startswith("# Experiment small, run ")
    assert "status: complete; cases ok: 40, not ok: 0" in text
    assert "fallbacks and mode details: tunnel=vxlan" in text
    assert "iperf3" in text and "kernel features:" in text


def test_report_lists_cases_that_were_not_measured(tmp_path: Path) -> None:
    spec_path, spec = load_fake_spec(tmp_path)
    store = RunStore.create(tmp_path / "results", spec.name)
    factory = FakeClusterFactory(fail_modes=["inpod"])
    execute(spec_path, spec, store, fake_runner(spec, store, factory))
    text = write_report(store.path).read_text()
    assert "## Cases not measured" in text
    assert (
        "| inpod-hbone-same-node-tcp_stream-p1-r2 | failed | cluster (inpod): RuntimeError" in text
    )


def test_report_gives_proxy_cpu_per_1000_requests(report_path: Path) -> None:
    text = report_path.read_text()
    assert "### Proxy vCPU per 1000 requests/s (http_fixed_qps)" in text
    row = (
        "| inpod | same-node | http_fixed_qps | connections=1 qps=1000 | proxy_vcpu_per_1000_rps |"
    )
    assert row in text


def test_proxy_cpu_per_1000_rps_sums_proxies_over_the_achieved_rate() -> None:
    case: dict[str, Any] = {"mode": "inpod", "placement": "same-node", "workload": "http_fixed_qps"}
    case |= {"connections": 4, "qps": 2000, "duration": 2, "repetition": 1, "status": "ok"}
    cpu = [("ztunnel-node1", 30.0), ("ztunnel-node2", 50.0)]
    rows = [{**case, "metric": "cpu_percent", "value": v, "process": p} for p, v in cpu]
    rows.append({**case, "metric": "cpu_seconds", "value": 9.9, "process": "ztunnel-node1"})
    rows.append({**case, "metric": "achieved_qps", "value": 2000.0})
    result = proxy_cpu_per_1000_rps(frame_from_rows(rows))
    assert len(result) == 1
    assert result["value"].iloc[0] == pytest.approx(0.8 / 2)  # 0.8 vCPU at 2000 rps
    assert result["unit"].iloc[0] == "vCPU"


def test_report_of_a_run_where_nothing_was_measured(tmp_path: Path) -> None:
    spec_path, spec = load_fake_spec(tmp_path)
    store = RunStore.create(tmp_path / "results", spec.name)
    factory = FakeClusterFactory(fail_modes=["none", "inpod"])
    execute(spec_path, spec, store, fake_runner(spec, store, factory))
    text = write_report(store.path).read_text()
    assert "cases ok: 0, not ok: 4" in text
    assert "![" not in text and text.count("| failed |") == 4


def test_report_has_a_native_row_its_ratio_and_marks_unsteady_cases(tmp_path: Path) -> None:
    text = SMALL_SPEC.replace("repetitions: 2", "repetitions: 4") + "peers: [native]\n"
    spec_path, spec = load_fake_spec(tmp_path, text)
    store = RunStore.create(tmp_path / "results", spec.name)

    def split_inpod(client: Any, server: Any, case: Case, raw_dir: Path | None) -> Any:
        rows = fake_stream(client, server, case, raw_dir)
        if case.mode != "inpod":
            return rows
        return [replace(rows[0], value=(2.7e9, 4.3e9)[case.repetition % 2])]

    runner = fake_runner(spec, store, FakeClusterFactory(), {"tcp_stream": split_inpod})
    execute(spec_path, spec, store, runner)
    report = write_report(store.path).read_text()
    assert "| ratio to none | ratio to native |" in report
    # fake native 4 Gbit/s x (1.01 .. 1.04), none 10 Gbit/s x the same: ratio 2.5
    assert "| native | same-node | tcp_stream | parallel=1 | throughput | 4.1 |" in report
    assert re.search(r"\| none \| same-node \| tcp_stream .* \| 4 \| 1 \| 2\.5 \|", report)
    inpod = re.search(r"\| inpod \| same-node \| tcp_stream .* \| 4 ⚠ bimodal \| (.*) \|", report)
    # inpod's median 3.5 Gbit/s over none's 10.25 and native's 4.1
    assert inpod is not None and inpod.group(1) == "0.3415 | 0.8537"
    assert "⚠ not steady over its repetitions" in report
    assert (
        "inpod same-node tcp_stream parallel=1: bimodal, ended as the spec's fixed count" in report
    )
    section = report[report.index("## Steadiness of the repetitions") :]
    assert "| inpod-hbone-same-node-tcp_stream-p1 | bimodal | 4 |" in section
    assert "Cases: 1 bimodal, 2 steady." in section
