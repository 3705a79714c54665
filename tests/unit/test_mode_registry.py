"""The registry is the one list of modes, and the base's lifecycle, without root.

A toy mode added through the registry alone shows up everywhere modes are listed: the
registry, experiment specs and the conformance suite's parametrisation.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING, Literal, cast

import pytest
from test_experiment_fakes import SMALL_SPEC, write_spec

from testbed.cluster.model import PodSpec, Topology
from testbed.experiment.spec import SpecError, load_spec
from testbed.redirect import MODES, ModeError, available_modes, create_mode
from testbed.redirect.base import Mode, ModeOptions

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod

README = Path(__file__).resolve().parents[2] / "README.md"


class ToyOptions(ModeOptions):
    colour: Literal["red", "blue"] = "red"


class ToyMode(Mode):
    """Steers nothing; records the order of what the base asks of it."""

    name = "toy"
    Options = ToyOptions

    def __init__(self, options: ModeOptions | None = None) -> None:
        super().__init__(options)
        self.calls: list[str] = []

    def capture(self, pod: Pod) -> None:
        self.calls.append(f"capture {pod.name}")

    def release(self, pod: Pod) -> None:
        self.calls.append(f"release {pod.name}")

    def push_config(self, topology: Topology | None = None) -> None:
        self.calls.append(f"push out={sorted(self.unenrolled)}")


class ToyL7Mode(ToyMode):
    name = "toy-l7"
    runs_waypoints = True


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MODES, "toy", ToyMode)
    monkeypatch.setitem(MODES, "toy-l7", ToyL7Mode)


def conformance() -> ModuleType:
    return importlib.import_module("integration.test_conformance")  # tests/ is on sys.path


# ---------------------------------------------------------------- the registry


def test_a_registered_mode_is_available_and_created_with_its_options(toy: None) -> None:
    assert {"toy", "toy-l7"} <= set(available_modes())
    mode = create_mode("toy", {"colour": "blue"})
    assert isinstance(mode, ToyMode)
    assert mode.facts() == {"colour": "blue"}


def test_spec_validation_takes_a_registered_mode(toy: None, tmp_path: Path) -> None:
    text = SMALL_SPEC.replace("[none, inpod]", "[none, {mode: toy, options: {colour: blue}}]")
    spec = load_spec(write_spec(tmp_path, text), available_modes=available_modes)
    assert [m.mode for m in spec.modes] == ["none", "toy"]
    bad = SMALL_SPEC.replace("[none, inpod]", "[{mode: toy, options: {colour: green}}]")
    with pytest.raises(SpecError, match=r"modes\[0\]: options: mode toy: option colour 'green'"):
        load_spec(write_spec(tmp_path, bad, name="bad.yaml"))


def test_conformance_parametrisation_takes_a_registered_mode(toy: None) -> None:
    suite = conformance()
    assert suite.mode_cases()["toy"] == ("toy", {})
    assert "toy-l7" in suite.l7_cases()
    assert "toy" not in suite.l7_cases()


def test_without_the_entry_the_toy_is_nowhere() -> None:
    assert "toy" not in available_modes()
    assert "toy" not in conformance().mode_cases()
    with pytest.raises(ModeError, match="unknown mode 'toy'; available: none, sidecar"):
        create_mode("toy")


def test_conformance_runs_every_variant_and_l7_where_istio_has_it() -> None:
    suite = conformance()
    assert list(suite.mode_cases()) == [
        "none", "sidecar", "inpod-redirect", "inpod-tproxy", "inpod-nftables", "legacy", "ebpf"
    ]  # fmt: skip
    # waypoints where Istio ran them; sidecar mode's L7 is in its sidecars
    assert list(suite.l7_cases()) == ["sidecar", "inpod", "legacy", "ebpf"]


def test_readme_modes_table_lists_the_registered_modes() -> None:
    section = README.read_text(encoding="utf-8").split("### Modes", 1)[1].split("\n#", 1)[0]
    listed = re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.MULTILINE)
    assert listed == available_modes()


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("mode", "options", "message"),
    [
        ("inpod", {"inpod_variant": "ebpf"},
         "mode inpod: option inpod_variant 'ebpf': expected 'redirect', 'tproxy' or 'nftables'"),
        ("legacy", {"tunel": "vxlan"},
         "mode legacy: unknown option 'tunel'; expected one of trust_domain, "
         "same_node_fast_path, tunnel"),
        ("none", {"trust_domain": "x"},
         "mode none: unknown option 'trust_domain'; it takes no options"),
    ],
)  # fmt: skip
def test_a_bad_option_is_one_error_naming_it(
    mode: str, options: dict[str, str], message: str
) -> None:
    with pytest.raises(ModeError) as caught:
        create_mode(mode, options)
    assert str(caught.value) == message


def test_option_values_from_the_command_line_are_coerced() -> None:
    assert create_mode("sidecar", {"trust_domain": 42}).facts()["trust_domain"] == "42"


# ---------------------------------------------------------------- the lifecycle


def fake_pod(name: str, labels: dict[str, str] | None = None) -> Pod:
    """What the lifecycle reads of a pod: its name and its spec (labels)."""
    return cast("Pod", SimpleNamespace(name=name, spec=PodSpec(name, "node1", labels=labels or {})))


def installed_toy() -> tuple[ToyMode, dict[str, Pod]]:
    opted_out = {"istio.io/dataplane-mode": "none"}
    pods = {p.name: p for p in (fake_pod("a"), fake_pod("b"), fake_pod("out", opted_out))}
    mode = ToyMode()
    mode.install(cast("Cluster", SimpleNamespace(pods=pods)))
    return mode, pods


def test_install_captures_the_captured_pods_only() -> None:
    mode, pods = installed_toy()
    assert mode.calls == ["capture a", "capture b"]
    assert mode.describe_pod(pods["out"]) == "out: not captured (istio.io/dataplane-mode=none)"


def test_unenroll_announces_first_and_enroll_announces_last() -> None:
    mode, pods = installed_toy()
    mode.calls.clear()
    for _ in range(2):  # the second time changes nothing
        mode.unenroll(pods["a"])
    assert mode.calls == ["push out=['a']", "release a"]
    assert mode.describe_pod(pods["a"]) == "a: not captured (unenrolled)"
    mode.calls.clear()
    for _ in range(2):
        mode.enroll(pods["a"])
    assert mode.calls == ["capture a", "push out=[]"]
