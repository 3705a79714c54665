"""Fuzz the ZDS codec (testbed/mesh/zds.py) and ztunnel's side of the session.

Properties: any bytes decode to a message or raise ZdsDecodeError (nothing else); encoding
then decoding any message gives it back; a ZdsClient sent an undecodable request answers it
with an Ack carrying an error (as Istio's ztunnel nacks a message it cannot read), closes
every fd that came with it, ends that session, and connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz_support import BATCH, note_outcome, replay, tried
from hypothesis import given
from hypothesis import strategies as st

from testbed.mesh import zds
from testbed.mesh.zds_client import ZdsClient

TARGET = "zds"


def one_input(data: bytes) -> None:
    """The decoder entry points on one packet: a value or ZdsDecodeError, nothing else."""
    if not tried(TARGET):
        return
    outcomes = []
    for decode in (zds.decode_request, zds.decode_ack, zds.decode_hello):
        try:
            outcomes.append(type(decode(data)).__name__)
        except zds.ZdsDecodeError:
            outcomes.append("error")
    note_outcome(TARGET, ",".join(outcomes), data)


def _field(number: int, wire_type: int, body: bytes) -> bytes:
    key = zds.encode_varint(number << 3 | wire_type)
    return key + (zds.encode_varint(len(body)) + body if wire_type == 2 else body)


# protobuf-shaped bytes reach deeper than uniform noise: nested LEN fields, odd wire types
_flat = st.builds(
    _field, st.integers(0, 6), st.sampled_from([0, 1, 2, 5, 3, 7]), st.binary(max_size=12)
)


def _nest(inner: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda n, parts: _field(n, 2, b"".join(parts)),
        st.integers(1, 6),
        st.lists(inner, max_size=3),
    )


_fields = st.one_of(_flat, _nest(_flat), _nest(_flat | _nest(_flat)))


@given(st.one_of(st.binary(max_size=300), st.lists(_fields, max_size=4).map(b"".join)))
def test_decoders_raise_only_zds_errors(data: bytes) -> None:
    one_input(data)


def test_saved_seeds_still_decode_or_fail_cleanly() -> None:
    replay(TARGET, one_input)


_text = st.text(max_size=300)  # past 127 bytes, lengths take two varint bytes
_requests = st.one_of(
    st.builds(
        zds.AddWorkload,
        _text,
        st.none() | st.builds(zds.WorkloadInfo, _text, _text, _text),
    ),
    st.builds(zds.KeepWorkload, _text),
    st.builds(zds.DelWorkload, _text),
    st.just(zds.SnapshotSent()),
)


@given(_requests)
def test_every_request_round_trips(request: zds.WorkloadRequest) -> None:
    if not tried("zds-roundtrip"):
        return
    assert zds.decode_request(zds.encode_request(request)) == request


@given(_text)
def test_every_ack_round_trips(error: str) -> None:
    assert zds.decode_ack(zds.encode_ack(error)) == error


# ---------------------------------------------------------------- the client's session


class _Accepting:
    """A ztunnel stand-in's handler: accepts every pod, closing the fd it now owns."""

    def on_add(self, uid: str, info: zds.WorkloadInfo | None, netns_fd: int) -> str:
        os.close(netns_fd)
        return ""

    def on_delete(self, uid: str) -> None:
        pass

    def on_snapshot_done(self, uids: set[str]) -> None:
        pass


class Agent:
    """The node agent's end: a SEQPACKET listener a ZdsClient (in its own thread) dials."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.listener.settimeout(10)
        self.client = ZdsClient(str(path), _Accepting(), min_backoff=0.001, max_backoff=0.01)
        self.loop = asyncio.new_event_loop()
        self.task = self.loop.create_task(self.client.run())
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.conn = self._accept()

    def _serve(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self.task)

    def _accept(self) -> socket.socket:
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        assert zds.decode_hello(conn.recv(64)) == zds.ZDS_VERSION_V1
        return conn

    def exchange(self, packet: bytes, with_fd: bool) -> str | None:
        """Send one packet (with an fd or not); the ack's error, None if no ack came."""
        fd_probe = None
        if with_fd:
            read_end, fd_probe = os.pipe()
            try:
                zds.send_packet(self.conn, packet, [read_end])
            finally:
                os.close(read_end)
        else:
            zds.send_packet(self.conn, packet)
        reply, _ = zds.recv_packet(self.conn)
        if fd_probe is not None:
            self._assert_fd_released(fd_probe)
        return zds.decode_ack(reply) if reply else None

    def session_ends_and_restarts(self) -> bool:
        """True if the client closes this session and dials a new one."""
        closed = self.conn.recv(64) == b""
        self.conn.close()
        self.conn = self._accept()
        return closed

    @staticmethod
    def _assert_fd_released(write_end: int) -> None:
        """The passed read end was closed (or kept by an accepted Add, which closes it)."""
        try:
            os.set_blocking(write_end, False)
            for _ in range(50):
                try:
                    os.write(write_end, b"x")
                except BrokenPipeError:
                    return
                except BlockingIOError:
                    break
                threading.Event().wait(0.01)
            raise AssertionError("the netns fd sent with a packet was never closed")
        finally:
            os.close(write_end)

    def close(self) -> None:
        self.conn.close()
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(timeout=5)
        self.loop.close()
        self.listener.close()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    running = Agent(tmp_path_factory.mktemp("zds") / "zds.sock")
    yield running
    running.close()


_packets = st.one_of(
    st.binary(min_size=1, max_size=200), st.lists(_fields, min_size=1, max_size=4).map(b"".join)
)


def nacks_or_acks(agent: Agent, packet: bytes) -> None:
    """One packet on the session: an undecodable one is nacked and ends the session."""
    if not tried("zds-client"):
        return
    try:
        request: zds.WorkloadRequest | None = zds.decode_request(packet)
    except zds.ZdsDecodeError:
        request = None
    error = agent.exchange(packet, with_fd=len(packet) % 2 == 1)
    note_outcome("zds-client", f"{type(request).__name__},{bool(error)}", packet)
    assert agent.thread.is_alive(), "the ZDS client task died"
    if request is None:
        assert error and "failure to read message" in error, error
        assert agent.session_ends_and_restarts(), "Istio ends a session that sent garbage"
    else:
        assert error is not None


@given(st.lists(_packets, min_size=BATCH, max_size=BATCH))
def test_client_nacks_what_it_cannot_read_and_reconnects(
    agent: Agent, packets: list[bytes]
) -> None:
    for packet in packets:  # one session, in order: a ZDS session is a sequence of requests
        nacks_or_acks(agent, packet)


def test_saved_client_seeds_still_get_nacked_or_acked(agent: Agent) -> None:
    replay("zds-client", lambda packet: nacks_or_acks(agent, packet))
