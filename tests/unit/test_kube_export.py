"""`testbed export`: golden manifests of two_nodes and reviews_waypoint, schema validation,
the README's notes, the node map and the sidecar variant."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s

from testbed.cli import main
from testbed.cluster import load_topology, plan
from testbed.kube.export import ExportError, parse_node_map, validated_core, write_export
from testbed.kube.resources import KINDS

GOLDEN = Path(__file__).parent / "fixtures" / "kube"
NODE_MAP = "node1=worker-a,node2=worker-b"


@pytest.mark.parametrize("name", ["two_nodes", "reviews_waypoint"])
def test_export_matches_golden(name: str, tmp_path: Path) -> None:
    assert main(["export", name, "--out", str(tmp_path), "--node-map", NODE_MAP]) == 0
    produced = {p.name: p.read_text() for p in sorted(tmp_path.iterdir())}
    if os.environ.get("UPDATE_GOLDEN"):
        (GOLDEN / name).mkdir(parents=True, exist_ok=True)
        for file, text in produced.items():
            (GOLDEN / name / file).write_text(text)
    expected = {p.name: p.read_text() for p in sorted((GOLDEN / name).iterdir())}
    assert produced == expected


def test_exported_istio_resources_read_back_through_their_models(tmp_path: Path) -> None:
    write_export(plan(load_topology("reviews_waypoint")), tmp_path)
    kinds = []
    for file in ("waypoints.yaml", "httproutes.yaml", "authorizationpolicies.yaml"):
        for doc in yaml.safe_load_all((tmp_path / file).read_text()):
            KINDS[(doc["apiVersion"], doc["kind"])].model_validate(doc)
            kinds.append(doc["kind"])
    assert kinds == ["Gateway", "HTTPRoute", "AuthorizationPolicy"]
    kustomization = yaml.safe_load((tmp_path / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in tmp_path.glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_an_invalid_core_object_is_refused() -> None:
    broken = k8s.V1Service(
        api_version="v1",
        kind="Service",
        metadata=k8s.V1ObjectMeta(name="x"),
        spec=k8s.V1ServiceSpec(ports=[k8s.V1ServicePort(port="eighty")]),  # not an integer
    )
    with pytest.raises(ExportError, match=r"does not validate against Kubernetes 1\.35\.0"):
        validated_core(broken)


def test_shaping_and_sidecar_mode_are_named_in_the_readme(tmp_path: Path) -> None:
    topology = plan(load_topology("two_nodes,rate=1gbit,delay=1ms"))
    write_export(topology, tmp_path, mode="sidecar")
    readme = (tmp_path / "README.md").read_text()
    assert "node node1: link shaping (rate=1gbit, delay=1ms" in readme
    assert "legacy, ebpf" in readme
    namespace = yaml.safe_load((tmp_path / "namespaces.yaml").read_text())
    assert namespace["metadata"]["labels"] == {"istio-injection": "enabled"}

    write_export(plan(load_topology("reviews_waypoint")), tmp_path / "rw", mode="sidecar")
    assert not (tmp_path / "rw" / "waypoints.yaml").exists()
    assert "ambient-only and were not exported" in (tmp_path / "rw" / "README.md").read_text()


def test_node_map_errors_name_the_item() -> None:
    topology = plan(load_topology("two_nodes"))
    assert parse_node_map("node1=a, node2=b", topology) == {"node1": "a", "node2": "b"}
    with pytest.raises(ExportError, match="'node9' is not a node"):
        parse_node_map("node9=a", topology)
    with pytest.raises(ExportError, match="expected NODE=KUBERNETES_NODE"):
        parse_node_map("node1", topology)


def test_cli_mistakes_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    occupied = tmp_path / "file"
    occupied.write_text("")
    assert main(["export", "two_nodes", "--out", str(occupied)]) == 2
    assert "cannot be made a folder" in capsys.readouterr().err
    assert main(["--root", str(tmp_path), "apply", "nosuch", str(occupied)]) == 2
    assert "no running testbed named 'nosuch'" in capsys.readouterr().err
    assert main(["export", "two_nodes", "--out", str(tmp_path / "x"), "--node-map", "a"]) == 2
    assert "expected NODE=KUBERNETES_NODE" in capsys.readouterr().err
