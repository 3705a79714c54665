"""Mode inpod's options and what it reports before anything runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from testbed.redirect import ModeError, create_mode, inpod_rules
from testbed.redirect.inpod import InPodMode


def test_defaults_are_redirect_and_cluster_local() -> None:
    mode = create_mode("inpod")
    assert isinstance(mode, InPodMode)
    assert mode.facts() == {"inpod_variant": "redirect", "trust_domain": "cluster.local"}
    assert (mode.rules_variant, mode.backend) == ("redirect", "iptables")
    assert mode.proxy_pids() == {}


@pytest.mark.parametrize(
    ("variant", "rules"),
    [("tproxy", ("tproxy", "iptables")), ("nftables", ("redirect", "nftables"))],
)
def test_variants_pick_rules_and_backend(variant: str, rules: tuple[str, str]) -> None:
    mode = InPodMode.from_options({"inpod_variant": variant, "trust_domain": "example.org"})
    assert (mode.rules_variant, mode.backend) == rules
    assert mode.facts()["trust_domain"] == "example.org"


@pytest.mark.parametrize(
    ("options", "message"),
    [({"inpod_variant": "ebpf"}, "inpod_variant 'ebpf'"), ({"variant": "x"}, "unknown option")],
)
def test_bad_options_are_refused(options: dict[str, str], message: str) -> None:
    with pytest.raises(ModeError, match=message):
        create_mode("inpod", options)


def test_release_removes_rules_before_del(monkeypatch: pytest.MonkeyPatch) -> None:
    """Istio's RemovePodFromMesh order: DeleteInpodRules, then the ZDS Del."""
    calls: list[str] = []

    class Agent:
        def unenroll(self, uid: str) -> None:
            calls.append(f"del {uid}")

    pod = SimpleNamespace(node="node1", spec=SimpleNamespace(uid="u1"), netns="ns")
    monkeypatch.setattr(inpod_rules, "uninstall", lambda netns: calls.append(f"rules {netns}"))
    mode = create_mode("inpod")
    assert isinstance(mode, InPodMode)
    mode.agents["node1"] = Agent()  # type: ignore[assignment]
    mode.release(pod)  # type: ignore[arg-type]
    assert calls == ["rules ns", "del u1"]
