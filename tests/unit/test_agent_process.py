"""The CNI agent process's control protocol: requests reach the agent, errors come back."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from testbed.mesh import zds
from testbed.redirect.agent_process import AgentClient, AgentError, handle, serve
from testbed.redirect.cni_agent import ZtunnelNotConnectedError


class FakeAgent:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def enroll(self, uid: str, info: zds.WorkloadInfo, netns_path: str) -> None:
        if uid == "offline":
            raise ZtunnelNotConnectedError("no ztunnel connected")
        self.calls.append(("enroll", uid, info, netns_path))

    def unenroll(self, uid: str) -> None:
        self.calls.append(("unenroll", uid))


def test_handle_maps_requests_to_agent_calls() -> None:
    agent = FakeAgent()
    request = {"op": "enroll", "uid": "default-a", "name": "a", "namespace": "default",
               "service_account": "sa", "netns": "/run/netns/x"}  # fmt: skip
    assert handle(agent, request) == ""  # type: ignore[arg-type]
    assert handle(agent, {"op": "unenroll", "uid": "default-a"}) == ""  # type: ignore[arg-type]
    info = zds.WorkloadInfo("a", "default", "sa")
    assert agent.calls == [("enroll", "default-a", info, "/run/netns/x"), ("unenroll", "default-a")]
    assert "missing field" in handle(agent, {"op": "enroll", "uid": "u"})  # type: ignore[arg-type]
    assert "unknown op" in handle(agent, {"op": "reboot"})  # type: ignore[arg-type]


def test_client_round_trip_over_the_control_socket(tmp_path: Path) -> None:
    agent = FakeAgent()
    path = str(tmp_path / "control.sock")
    threading.Thread(target=serve, args=(agent, path), daemon=True).start()
    client = AgentClient(path)
    client.wait_listening(timeout=5)
    client.enroll("default-b", zds.WorkloadInfo("b", "default", "b"), "/run/netns/b")
    assert agent.calls[-1][:2] == ("enroll", "default-b")
    with pytest.raises(AgentError, match="no ztunnel connected"):
        client.enroll("offline", zds.WorkloadInfo("o", "default", "o"), "/run/netns/o")


def test_client_reports_a_missing_agent(tmp_path: Path) -> None:
    with pytest.raises(AgentError):
        AgentClient(tmp_path / "nobody.sock").wait_listening(timeout=0.1)
