"""ZDS codec against hand-computed protobuf bytes, and agent <-> client over a real
unix SEQPACKET socket (regular files stand in for netns files: no root needed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.mesh import zds
from testbed.mesh.zds_client import ZdsClient
from testbed.redirect.agent_process import restore_snapshot, snapshot_entry
from testbed.redirect.cni_agent import (
    CniAgent,
    ZtunnelNotConnectedError,
    ZtunnelRejectedError,
)

INFO = zds.WorkloadInfo("a", "b", "c")

# ---------------------------------------------------------------- codec


@pytest.mark.parametrize(
    ("value", "wire"), [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (300, b"\xac\x02")]
)
def test_varint(value: int, wire: bytes) -> None:
    assert zds.encode_varint(value) == wire
    assert list(zds.iter_fields(b"\x08" + wire)) == [(1, 0, value)]


def test_hello_bytes() -> None:
    assert zds.encode_hello() == b"\x08\x01"
    assert zds.decode_hello(b"\x08\x01") == zds.ZDS_VERSION_V1
    assert zds.decode_hello(b"") == 0  # proto3 default: NOT_USED


def test_ack_bytes() -> None:
    assert zds.encode_ack() == b"\x0a\x00"
    assert zds.encode_ack("no") == b"\x0a\x04\x0a\x02no"
    assert zds.decode_ack(b"\x0a\x00") == ""
    assert zds.decode_ack(b"\x0a\x04\x0a\x02no") == "no"


@pytest.mark.parametrize(
    ("request_", "wire"),
    [
        (
            zds.AddWorkload("u1", INFO),
            b"\x0a\x0f\x0a\x02u1\x12\x09\x0a\x01a\x12\x01b\x1a\x01c",
        ),
        (zds.AddWorkload("u1"), b"\x0a\x04\x0a\x02u1"),
        (zds.DelWorkload("u1"), b"\x12\x04\x12\x02u1"),
        (zds.KeepWorkload("u1"), b"\x2a\x04\x0a\x02u1"),
        (zds.SnapshotSent(), b"\x1a\x00"),
    ],
)
def test_request_bytes_and_round_trip(request_: zds.WorkloadRequest, wire: bytes) -> None:
    assert zds.encode_request(request_) == wire
    assert zds.decode_request(wire) == request_


def test_unknown_fields_are_skipped() -> None:
    # WorkloadInfo with the deprecated trust_domain (field 4) plus a varint and a fixed64
    info = b"\x0a\x01a\x22\x02td\x28\x07\x31" + bytes(8)
    add = b"\x0a\x02u1\x12" + bytes([len(info)]) + info
    decoded = zds.decode_request(b"\x0a" + bytes([len(add)]) + add)
    assert decoded == zds.AddWorkload("u1", zds.WorkloadInfo(name="a"))


@pytest.mark.parametrize("wire", [b"\x0a\x05\x0a", b"\x08\x80", b"\x0b", b"\x22\x00"])
def test_malformed_input_is_rejected(wire: bytes) -> None:
    with pytest.raises(zds.ZdsDecodeError):
        zds.decode_request(wire)


def test_ack_without_payload_is_rejected() -> None:
    with pytest.raises(zds.ZdsDecodeError):
        zds.decode_ack(b"")


# ---------------------------------------------------------------- agent <-> client


class Recorder:
    """A ztunnel stand-in: records calls, keeps fds' inode numbers, refuses uid 'bad'."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.changed = threading.Condition()

    def _record(self, event: tuple[str, object]) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    async def on_add(self, uid: str, info: zds.WorkloadInfo | None, netns_fd: int) -> str:
        self._record(("add", (uid, info, os.fstat(netns_fd).st_ino)))
        if uid == "bad":
            return "refused"
        os.close(netns_fd)
        return ""

    def on_delete(self, uid: str) -> None:
        self._record(("del", uid))

    def on_snapshot_done(self, uids: set[str]) -> None:
        self._record(("snapshot", frozenset(uids)))

    def wait_for(self, event: tuple[str, object], timeout: float = 5.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: event in self.events, timeout), self.events


class ClientThread:
    """Runs a ZdsClient on its own event loop thread, like ztunnel would."""

    def __init__(self, path: Path, handler: Recorder) -> None:
        self.client = ZdsClient(str(path), handler, min_backoff=0.01, max_backoff=0.05)
        self.loop = asyncio.new_event_loop()
        self.task = self.loop.create_task(self.client.run())
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self.task)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(timeout=5)
        self.loop.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[CniAgent]:
    with CniAgent(tmp_path / "zds.sock", ack_timeout=2.0) as running:
        yield running


def fake_netns(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.write_text(name)
    return str(path)


def test_enroll_without_ztunnel_fails_clearly(agent: CniAgent, tmp_path: Path) -> None:
    with pytest.raises(ZtunnelNotConnectedError, match="no ztunnel connected"):
        agent.enroll("u1", INFO, fake_netns(tmp_path, "ns1"), timeout=0.1)
    assert agent.enrolled() == []


def test_enroll_unenroll_and_snapshot_replay(agent: CniAgent, tmp_path: Path) -> None:
    recorder = Recorder()
    ztunnel = ClientThread(Path(agent.socket_path), recorder)
    try:
        agent.wait_connected()
        recorder.wait_for(("snapshot", frozenset()))
        ns1 = fake_netns(tmp_path, "ns1")
        agent.enroll("u1", INFO, ns1)
        assert ("add", ("u1", INFO, os.stat(ns1).st_ino)) in recorder.events
        with pytest.raises(ZtunnelRejectedError, match="refused"):
            agent.enroll("bad", INFO, fake_netns(tmp_path, "ns2"))
        assert agent.enrolled() == ["u1"]
        agent.unenroll("u1")
        recorder.wait_for(("del", "u1"))
        agent.enroll("u3", INFO, fake_netns(tmp_path, "ns3"))
    finally:
        ztunnel.stop()

    # ztunnel restarts: the agent replays what is enrolled now, then SnapshotSent
    restarted = Recorder()
    ztunnel = ClientThread(Path(agent.socket_path), restarted)
    try:
        restarted.wait_for(("snapshot", frozenset({"u3"})))
        assert [kind for kind, _ in restarted.events] == ["add", "snapshot"]
        assert agent.enrolled() == ["u3"]  # waits for the agent to finish the snapshot
        assert agent.snapshots_sent == 2
    finally:
        ztunnel.stop()


def test_client_reconnects_when_agent_restarts(tmp_path: Path) -> None:
    recorder = Recorder()
    path = tmp_path / "zds.sock"
    ztunnel = ClientThread(path, recorder)  # starts before the agent exists: retries
    try:
        for _ in range(2):
            with CniAgent(path) as agent:
                agent.enroll("u1", INFO, fake_netns(tmp_path, "ns1"))
        assert ztunnel.client.connections >= 2
    finally:
        ztunnel.stop()


def test_client_acks_add_without_fd_as_error_and_honours_keep(tmp_path: Path) -> None:
    path = tmp_path / "raw.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(5)
        recorder = Recorder()
        ztunnel = ClientThread(path, recorder)
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                assert zds.decode_hello(conn.recv(64)) == zds.ZDS_VERSION_V1
                conn.send(zds.encode_request(zds.AddWorkload("u1", INFO)))
                assert "no netns fd" in zds.decode_ack(conn.recv(64))
                conn.send(zds.encode_request(zds.KeepWorkload("u2")))
                assert zds.decode_ack(conn.recv(64)) == ""
                conn.send(zds.encode_request(zds.SnapshotSent()))
                assert zds.decode_ack(conn.recv(64)) == ""
            recorder.wait_for(("snapshot", frozenset({"u2"})))
            assert not any(kind == "add" for kind, _ in recorder.events)
        finally:
            ztunnel.stop()


def test_a_restarted_agent_sends_the_pods_it_was_given_before_serving(tmp_path: Path) -> None:
    """As Istio's agent (ConstructInitialSnapshot): a ztunnel that reconnects to a new agent
    gets the pods already in the mesh, so it keeps them, instead of an empty snapshot."""
    ns1, ns2 = fake_netns(tmp_path, "ns1"), fake_netns(tmp_path, "ns2")
    snapshot = tmp_path / "snapshot.json"
    snapshot.write_text(
        json.dumps(
            [
                snapshot_entry("u1", INFO, ns1),
                snapshot_entry("u2", INFO, ns2),
                snapshot_entry("gone", INFO, str(tmp_path / "deleted")),
            ]
        )
    )
    recorder = Recorder()
    agent = CniAgent(tmp_path / "zds.sock")
    restore_snapshot(agent, str(snapshot))
    with agent:
        with pytest.raises(RuntimeError, match="before start"):
            agent.restore("u3", INFO, ns1)
        ztunnel = ClientThread(Path(agent.socket_path), recorder)
        try:
            recorder.wait_for(("snapshot", frozenset({"u1", "u2"})))
            assert ("add", ("u1", INFO, os.stat(ns1).st_ino)) in recorder.events
            assert sorted(agent.enrolled()) == ["u1", "u2"]
        finally:
            ztunnel.stop()
