"""The inpod option `ztunnel` (Istio's ztunnel binary): validated before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.redirect import ModeError, create_mode
from testbed.redirect.inpod import InPodMode
from testbed.redirect.istio_ztunnel import binaries_by_node, version_line, ztunnel_env
from testbed.redirect.registry import create_labelled_mode


@pytest.fixture
def binary(tmp_path: Path) -> Path:
    path = tmp_path / "ztunnel"
    path.write_text("#!/bin/sh\necho 'client version: fake-1.0'\n")
    path.chmod(0o755)
    return path


def test_one_path_is_for_every_node(binary: Path) -> None:
    mode = create_mode("inpod", {"ztunnel": str(binary)})
    assert isinstance(mode, InPodMode)
    assert mode.facts()["ztunnel"] == str(binary)
    assert binaries_by_node(str(binary), ["node1", "node2"]) == {"node1": binary, "node2": binary}


def test_node_paths_choose_a_mixed_fleet(binary: Path) -> None:
    value = f"node1:{binary}"
    create_mode("inpod", {"ztunnel": value})
    assert binaries_by_node(value, ["node1", "node2"]) == {"node1": binary}
    with pytest.raises(ValueError, match="no node node9; nodes: node1, node2"):
        binaries_by_node(f"node9:{binary}", ["node1", "node2"])


def test_without_the_option_no_node_runs_istios() -> None:
    assert "ztunnel" not in create_mode("inpod").facts()
    assert binaries_by_node(None, ["node1"]) == {}


@pytest.mark.parametrize("kind", ["missing", "not-executable", "directory", "node-missing"])
def test_a_path_that_is_no_executable_is_one_mode_error(
    tmp_path: Path, binary: Path, kind: str
) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    value = {
        "missing": str(tmp_path / "nope"),
        "not-executable": str(plain),
        "directory": str(tmp_path),
        "node-missing": f"node1:{binary},node2:{tmp_path / 'nope'}",
    }[kind]
    with pytest.raises(ModeError, match=r"mode inpod: option ztunnel .*is not an executable file"):
        create_mode("inpod", {"ztunnel": value})


def test_the_environment_names_config_agent_and_ca(tmp_path: Path) -> None:
    env = ztunnel_env(
        "node2",
        config=tmp_path / "mesh.yaml",
        zds_socket=tmp_path / "zds.sock",
        trust_domain="cluster.local",
        ca_env={"CA_ADDRESS": "https://10.244.0.3:15012"},
    )
    assert env["LOCAL_XDS_PATH"] == str(tmp_path / "mesh.yaml")
    assert env["XDS_ADDRESS"] == ""
    assert env["INPOD_UDS"] == str(tmp_path / "zds.sock")
    assert (env["NODE_NAME"], env["PROXY_MODE"]) == ("node2", "shared")
    assert env["CA_ADDRESS"] == "https://10.244.0.3:15012"


def test_doctor_line(binary: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TESTBED_ZTUNNEL", raising=False)
    ok, detail = version_line()
    assert not ok and "TESTBED_ZTUNNEL unset" in detail
    assert version_line(str(binary)) == (
        True,
        f"TESTBED_ZTUNNEL={binary}: client version: fake-1.0",
    )


def test_bench_label_takes_the_binary_from_testbed_ztunnel(
    binary: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TESTBED_ZTUNNEL", raising=False)
    with pytest.raises(ModeError, match="set TESTBED_ZTUNNEL"):
        create_labelled_mode("inpod+istio-ztunnel")
    with pytest.raises(ModeError, match="only inpod\\+istio-ztunnel"):
        create_labelled_mode("legacy+istio-ztunnel")
    monkeypatch.setenv("TESTBED_ZTUNNEL", str(binary))
    mode = create_labelled_mode("inpod+istio-ztunnel")
    assert mode.facts()["ztunnel"] == str(binary)
    assert "ztunnel" not in create_labelled_mode("inpod").facts()
