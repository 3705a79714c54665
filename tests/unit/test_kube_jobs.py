"""`testbed export-experiment`: Jobs with the spec's cases, pinned by the node map, valid
against the Kubernetes schemas, and the image's Containerfile."""

from __future__ import annotations

from pathlib import Path

import yaml

from testbed.cli import main
from testbed.experiment.cases import mode_cases
from testbed.experiment.spec import ModeSpec, load_spec
from testbed.redirect import available_modes

SPEC = Path(__file__).resolve().parents[2] / "experiments" / "baseline.yaml"


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_jobs_carry_the_specs_cases_and_the_node_map(tmp_path: Path) -> None:
    args = ["export-experiment", str(SPEC), "--out", str(tmp_path), "--mode", "none",
            "--node-map", "node1=worker-a,node2=worker-b"]  # fmt: skip
    assert main(args) == 0
    spec = load_spec(SPEC, available_modes=available_modes)
    expected = [c.parameters() for c in mode_cases(spec, ModeSpec(mode="none"))]
    namespace = yaml.safe_load((tmp_path / "namespace.yaml").read_text())
    assert namespace["metadata"]["labels"] == {"istio.io/dataplane-mode": "none"}
    seen = []
    for placement, server_node in (("same-node", "worker-a"), ("cross-node", "worker-b")):
        docs = list(yaml.safe_load_all((tmp_path / f"{placement}.yaml").read_text()))
        assert [d["kind"] for d in docs] == ["Deployment", "Service", "Job"]
        server_pod = docs[0]["spec"]["template"]["spec"]
        assert server_pod["nodeSelector"] == {"kubernetes.io/hostname": server_node}
        job_pod = docs[2]["spec"]["template"]["spec"]
        assert job_pod["nodeSelector"] == {"kubernetes.io/hostname": "worker-a"}
        command = job_pod["containers"][0]["command"]
        assert command[:3] == ["python3", "-m", "testbed.kube.job"]
        cases = yaml.safe_load(_option(command, "--cases"))
        assert {c["placement"] for c in cases} == {placement}
        seen += cases
    assert sorted(seen, key=str) == sorted(expected, key=str)
    assert "apt-get install" in (tmp_path / "Containerfile").read_text()
    readme = (tmp_path / "README.md").read_text()
    assert "kubectl -n testbed-baseline logs job/measure-cross-node" in readme
    assert "testbed import rows.jsonl" in readme
