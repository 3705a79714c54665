"""The exported Job's entry point run inside a testbed pod against testbed servers: its rows
go through `testbed import`, and `testbed compare` reads them against a local run of the
same spec."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import yaml

from testbed.cli import main
from testbed.cluster import Cluster
from testbed.experiment import run_experiment
from testbed.experiment.compare import compare_runs
from testbed.kube.export import APPS
from testbed.measure.servers import wait_listening
from testbed.redirect import create_mode
from testbed.results import load


def local_python(argv: list[str]) -> list[str]:
    return [sys.executable if word == "python3" else word for word in argv]


def test_job_rows_from_a_pod_import_and_compare(runs_root: Path, tmp_path: Path) -> None:
    spec = tmp_path / "kjob.yaml"
    spec.write_text(
        textwrap.dedent("""
        name: kjob
        topology: two_nodes
        modes: [none]
        workloads: [tcp_stream, tcp_rr]
        placements: [cross-node]
        repetitions: 2
        warmup: 0
        duration: 1
        """)
    )
    results = tmp_path / "results"
    local = run_experiment(spec, results_dir=results, show_progress=False)
    out = tmp_path / "k8s"
    assert main(["export-experiment", str(spec), "--out", str(out), "--mode", "none"]) == 0
    (job,) = [d for d in yaml.safe_load_all((out / "cross-node.yaml").read_text())
              if d["kind"] == "Job"]  # fmt: skip
    command = local_python(job["spec"]["template"]["spec"]["containers"][0]["command"])

    with Cluster("two_nodes", create_mode("none"), name="kubejob", root=runs_root) as cluster:
        server = cluster.pod("server2")
        for port in (5201, 11111):
            name, argv = APPS[port]
            wait_listening(server, server.spawn(local_python(argv), label=name), port)
        command[command.index("--server") + 1] = server.ip
        done = cluster.pod("client").run(command, timeout=120)
    log = tmp_path / "rows.jsonl"
    log.write_text(done.stdout + done.stderr)  # as `kubectl logs` shows both

    assert main(["import", str(log), "--name", "k8s", "--results", str(results)]) == 0
    (imported,) = results.glob("*-k8s")
    frame = load(imported)
    assert set(frame["status"]) == {"ok"}
    assert {"throughput", "rtt_p50"} <= set(frame["metric"])
    assert set(frame["mode"]) == {"none"} and set(frame["platform"]) == {"kubernetes"}
    report = compare_runs(local, imported)
    assert f"B: {imported.name}" in report
    compared = re.search(r"Compared (\d+) \(case, metric\) pairs", report)
    assert compared is not None and int(compared.group(1)) > 0, report  # the cases lined up
