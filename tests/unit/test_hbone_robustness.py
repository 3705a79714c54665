"""HBONE against bad peers: each failure closes only its own connection; identities checked."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from hbone_support import Identities, Tunnel, echo_until_eof, h2_connect, run, tunnel, upstream

from testbed.mesh.hbone import HboneError, client_context
from testbed.mesh.hbone import frames as fr
from testbed.mesh.hbone.testcerts import TestPki


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Identities:
    pki = TestPki(Path(tmp_path_factory.mktemp("pki")))
    return Identities(pki, pki.identity("ns-b", "sa-b"), pki.identity("ns-a", "sa-a"))


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the connection (a reset counts as closed)."""
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""
    except TimeoutError:
        pytest.fail("the server kept a bad connection open for 10 s")


async def still_serves(t: Tunnel, authority: str) -> None:
    reader, writer, relay = await t.open(authority)
    writer.write(b"ok?")
    writer.write_eof()
    assert await reader.read() == b"ok?"
    await relay


def raw_tls_connection(ids: Identities) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    return ids.client_ctx().wrap_bio(incoming, outgoing), incoming, outgoing


@pytest.mark.parametrize(
    "attack",
    [b"\x00garbage\xff" * 100, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01"],
    ids=["garbage", "plain-http", "half-client-hello"],
)
def test_bad_bytes_close_only_that_connection(
    ids: Identities, attack: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with upstream(echo_until_eof) as authority, tunnel(ids) as t:
            reader, writer = await asyncio.open_connection(*t.server.address)
            writer.write(attack)
            if attack.startswith(b"\x16"):
                await still_serves(t, authority)  # while the handshake hangs half done
                writer.write_eof()
            assert await read_until_closed(reader) == b""  # closed, answering nothing
            writer.close()
            await still_serves(t, authority)

    with caplog.at_level(logging.WARNING, logger="testbed.mesh.hbone"):
        run(main())
    closing = [r for r in caplog.records if "closing connection" in r.getMessage()]
    assert len(closing) == 1


def _tls_then(ids: Identities, address: tuple[str, int], payload: bytes) -> list[object]:
    """Handshake properly, send `payload` in place of HTTP/2, return the h2 events seen."""
    with (
        socket.create_connection(address, timeout=10) as raw,
        ids.client_ctx().wrap_socket(raw) as tls,
    ):
        tls.sendall(payload)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()  # only to parse what the server sends back
        events: list[object] = []
        while data := tls.recv(65536):
            events.extend(conn.receive_data(data))
        return events


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"PRI * HTTP/1.1\r\n\r\nXX\r\n\r\n", fr.PROTOCOL_ERROR),
        (fr.PREFACE + fr.settings_frame({}) + fr.frame(fr.DATA, 0, 0, b"x"), fr.PROTOCOL_ERROR),
        (fr.PREFACE + fr.frame(fr.PING, 0, 0, b"short"), fr.FRAME_SIZE_ERROR),
        (fr.PREFACE + b"\x7f\xff\xff\x00\x00\x00\x00\x00\x00", fr.FRAME_SIZE_ERROR),
    ],
    ids=["bad-preface", "data-on-stream-0", "short-ping", "huge-frame"],
)
def test_bad_http2_gets_goaway_and_server_keeps_serving(
    ids: Identities, payload: bytes, code: int
) -> None:
    async def main() -> None:
        async with upstream(echo_until_eof) as authority, tunnel(ids) as t:
            events = await asyncio.to_thread(_tls_then, ids, t.server.address, payload)
            goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
            assert [g.error_code for g in goaways] == [code]
            await still_serves(t, authority)

    run(main())


def test_untrusted_client_certificate_is_rejected(ids: Identities, tmp_path: Path) -> None:
    stranger = TestPki(tmp_path).identity("ns-a", "sa-a")  # same SAN, foreign root
    context = client_context(stranger.cert, stranger.key, ids.pki.roots)

    async def main() -> None:
        async with upstream(echo_until_eof) as authority, tunnel(ids) as t:
            with pytest.raises(HboneError):
                await t.open(authority, ssl_context=context)
            assert t.requests == []
            await still_serves(t, authority)

    run(main())


def test_client_rejects_a_server_with_an_unexpected_identity(ids: Identities) -> None:
    async def main() -> None:
        async with upstream(echo_until_eof) as authority, tunnel(ids) as t:
            wanted = "spiffe://cluster.local/ns/ns-x/sa/other"
            with pytest.raises(HboneError, match="not one of the expected") as failure:
                await t.open(authority, expected_identities={wanted})
            assert ids.server.uri in str(failure.value)
            assert t.requests == []

    run(main())


@pytest.mark.parametrize(
    ("method_headers", "deny", "status"),
    [
        ([(":method", "CONNECT")], False, 200),
        ([(":method", "CONNECT")], True, 401),
        ([(":method", "GET"), (":scheme", "https"), (":path", "/")], False, 400),
    ],
)
def test_interop_with_an_h2_library_client(
    ids: Identities, method_headers: list[tuple[str, str]], deny: bool, status: int
) -> None:
    async def main() -> int:
        async with upstream(echo_until_eof) as authority, tunnel(ids) as t:
            host, port = authority.rsplit(":", 1)
            if deny:
                t.deny.add((host, int(port)))
            headers = [*method_headers, (":authority", authority)]
            return await asyncio.to_thread(h2_connect, t.server.address, ids.client_ctx(), headers)

    assert run(main()) == status
