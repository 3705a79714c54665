"""The Job's entry point (testbed.kube.job) and `testbed import`: rows a Job prints become a
results directory that `testbed compare` reads next to a local run."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from testbed.cli import main
from testbed.experiment.cases import Case
from testbed.experiment.compare import compare_runs
from testbed.experiment.rows import case_row, measurement_rows
from testbed.experiment.store import RunStore
from testbed.experiment.workloads import WORKLOADS
from testbed.kube import job
from testbed.kube.importer import RowsError, import_rows
from testbed.measure.rows import Measurement

CONTEXT = {"experiment": "exp", "run_id": "kubernetes", "topology": "two_nodes", "pinning": "none"}


def case(repetition: int) -> Case:
    return Case("inpod", "cross-node", "tcp_stream", repetition, 3, 0, parallel=1)


def fake_stream(value: float) -> Any:
    def workload(client: Any, server: Any, c: Case, raw_dir: Path | None) -> list[Measurement]:
        assert server.run(["ss", "-H", "-ltn", "sport", "=", f":{server.port}"]).returncode == 0
        return [Measurement("throughput", value + c.repetition, "bit/s", {"tool": "iperf3"})]

    return workload


def test_remote_server_answers_only_the_listening_probe() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        server = job.RemoteServer("127.0.0.1", "server")
        assert server.run(["ss", "-H", "-ltn", "sport", "=", f":{port}"]).stdout
        assert server.spawn(["iperf3", "-s"], label="x").poll() is None
        with pytest.raises(RuntimeError, match="runs no commands"):
            server.run(["iperf3", "-s"])
        assert server.listening == {port}  # later probes do not connect again
    fresh = job.RemoteServer("127.0.0.1", "server")
    assert fresh.run(["ss", "-H", "-ltn", "sport", "=", f":{port}"]).returncode == 1


def job_rows(monkeypatch: pytest.MonkeyPatch, value: float) -> list[dict[str, Any]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = job.RemoteServer("127.0.0.1", "server")
        server.port = listener.getsockname()[1]  # type: ignore[attr-defined]
        monkeypatch.setitem(WORKLOADS, "tcp_stream", fake_stream(value))
        rows = []
        for rep in (1, 2, 3):
            rows += job.run_case(
                case(rep), job.ContainerHost(), server, CONTEXT, job.cluster_facts()
            )
    return rows


def test_job_rows_import_and_compare_with_a_local_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    rows = job_rows(monkeypatch, 5e9)
    assert [r["status"] for r in rows] == ["ok"] * 3 and rows[0]["platform"] == "kubernetes"
    log = tmp_path / "rows.jsonl"
    log.write_text("case 1/3 ...\n" + "".join(json.dumps(r) + "\n" for r in rows))

    assert main(["import", str(log), "--name", "real", "--results", str(tmp_path)]) == 0
    (imported,) = tmp_path.glob("*-real")
    metadata = json.loads((imported / "metadata.json").read_text())
    assert metadata["platform"] == "kubernetes" and metadata["skipped_lines"] == 1
    assert metadata["cases_ok"] == 3 and (imported / "results.parquet").exists()

    local = RunStore.create(tmp_path, "local")
    for rep in (1, 2, 3):
        base = case_row(case(rep), {**CONTEXT, "run_id": local.run_id}, {}, "t")
        local.append_rows(measurement_rows(base, [Measurement("throughput", 1e9 + rep, "bit/s")]))
    local.finalize()
    report = compare_runs(local.path, imported)
    assert "throughput" in report


def test_import_names_the_bad_line(tmp_path: Path) -> None:
    log = tmp_path / "rows.jsonl"
    log.write_text('{"experiment": "x"}\n')
    with pytest.raises(RowsError, match=r"rows.jsonl:1: not a testbed row"):
        import_rows(log, "bad", tmp_path)
    log.write_text("nothing here\n")
    with pytest.raises(RowsError, match="no rows"):
        import_rows(log, "bad", tmp_path)
