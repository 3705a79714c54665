"""Fuzz the HBONE server end to end after the TLS handshake (testbed.mesh.hbone).

A real HboneServer runs in its own process on loopback (hbone_server.py). Each input is
what a client with a valid certificate sends once mutual TLS 1.3 is up: the HTTP/2 preface
and frames of every type with wrong lengths, flags and stream ids, window overflows, HPACK
bombs, CONTINUATION floods, resets mid-stream; then a PING probe and a half-close.
Properties: the server process lives; what it sends is HTTP/2; a connection it ends on its
own ends with a GOAWAY error code; an HBONE stream opened before (the h2 library as an
independent client) keeps echoing; the server's RSS stays under a bound.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from fuzz_support import (
    BATCH,
    h2_probe,
    h2_verdict,
    in_parallel,
    note_outcome,
    replay,
    rss_bytes,
    tried,
)
from h2_inputs import h2_inputs
from hypothesis import given
from hypothesis import strategies as st

from testbed.mesh.hbone import client_context
from testbed.mesh.hbone.testcerts import TestPki

TARGET = "hbone"
RSS_LIMIT = 256 << 20  # the server's whole RSS: ~60 MiB idle with its 1 MiB buffers
SERVER = Path(__file__).with_name("hbone_server.py")


def tls_exchange(
    address: tuple[str, int],
    context: ssl.SSLContext,
    data: bytes,
    session: ssl.SSLSession | None = None,
    timeout: float = 10.0,
) -> tuple[bytes, ssl.SSLSession | None]:
    """Handshake (resuming `session`: a third of the cost), send `data`, half-close the TCP
    stream; the plaintext received until the server closed, and the session to resume."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, session=session)
    received = bytearray()
    with socket.create_connection(address, timeout=timeout) as sock:

        def pump() -> bool:
            if pending := outgoing.read():
                sock.sendall(pending)
            chunk = sock.recv(65536)
            if chunk:
                incoming.write(chunk)
            else:
                incoming.write_eof()
            return bool(chunk)

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if not pump():
                    raise ConnectionError("closed during the handshake") from None
        tls.write(data)
        try:
            sock.sendall(outgoing.read())
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        while True:
            try:
                received += tls.read(1 << 20)
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            try:
                if not pump():
                    break
            except ConnectionResetError:
                break
    return bytes(received), tls.session


class Canary:
    """One HBONE stream through the server to its echo upstream, kept open all run."""

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, echo: int) -> None:
        raw = socket.create_connection(address, timeout=10)
        self.tls = context.wrap_socket(raw)
        config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.stream_id = self.conn.get_next_available_stream_id()
        headers = [(":method", "CONNECT"), (":authority", f"127.0.0.1:{echo}")]
        self.conn.send_headers(self.stream_id, headers)
        self.tls.sendall(self.conn.data_to_send())
        self.sent = 0
        assert self._until(lambda e: isinstance(e, h2.events.ResponseReceived))

    def _until(self, done: Callable[[h2.events.Event], bool]) -> bool:
        while True:
            data = self.tls.recv(65536)
            if not data:
                return False
            events = self.conn.receive_data(data)
            for event in events:
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length or 0, event.stream_id or 0
                    )
            self.tls.sendall(self.conn.data_to_send())
            if any(done(e) for e in events):
                return True

    def flows(self) -> bool:
        self.sent += 1
        message = f"canary {self.sent}".encode()
        self.conn.send_data(self.stream_id, message)
        self.tls.sendall(self.conn.data_to_send())
        return self._until(lambda e: isinstance(e, h2.events.DataReceived) and e.data == message)


class HboneUnderFuzz:
    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="hbone-fuzz-")
        pki = TestPki(Path(self.tmp.name))
        pki.identity("ns-b", "sa-b")
        client = pki.identity("ns-a", "sa-a")
        self.context = client_context(client.cert, client.key, client.roots)
        self.server = subprocess.Popen(
            [sys.executable, str(SERVER), self.tmp.name],
            stdin=subprocess.PIPE,  # it ends when this closes (fuzz_support.end_with_parent)
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.server.stdout is not None
        port, echo = (int(p) for p in self.server.stdout.readline().split())
        self.address = ("127.0.0.1", port)
        self.canary = Canary(self.address, self.context, echo)
        self.session: ssl.SSLSession | None = None

    def attack(self, data: bytes) -> None:
        if not tried(TARGET):
            return
        received, self.session = tls_exchange(
            self.address, self.context, data + h2_probe(), self.session
        )
        verdict = h2_verdict(received)
        note_outcome(TARGET, f"{verdict.goaway_codes[-1:]},{verdict.ping_acked}", data)
        verdict.check(data)

    def batch(self, inputs: list[bytes]) -> None:
        """Inputs on concurrent connections, then the properties of the whole server."""
        try:
            in_parallel(self.attack, inputs)
        finally:
            assert self.server.poll() is None, "the HBONE server process died"
        assert self.canary.flows(), "the HBONE stream opened before stopped flowing"
        assert rss_bytes(self.server.pid) < RSS_LIMIT, "the HBONE server's memory grows"

    def one_input(self, data: bytes) -> None:
        self.batch([data])

    def close(self) -> None:
        self.canary.tls.close()
        self.server.kill()
        self.server.wait()
        self.tmp.cleanup()


def make_target() -> Callable[[bytes], None]:
    return HboneUnderFuzz().one_input


@pytest.fixture(scope="module")
def hbone() -> Iterator[HboneUnderFuzz]:
    running = HboneUnderFuzz()
    yield running
    running.close()


@given(st.lists(h2_inputs(), min_size=BATCH, max_size=BATCH))
def test_hostile_http2_after_tls_closes_only_that_connection(
    hbone: HboneUnderFuzz, inputs: list[bytes]
) -> None:
    hbone.batch(inputs)


def test_saved_seeds_still_get_goaway_or_answers(hbone: HboneUnderFuzz) -> None:
    replay(TARGET, hbone.one_input)
