"""HBONE end to end on loopback: status codes, byte integrity, half-close, pooling."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from pathlib import Path

import pytest
from hbone_support import (
    Identities,
    echo_until_eof,
    listening_socket,
    reset,
    run,
    tunnel,
    upstream,
)

from testbed.mesh.hbone import HboneError, StreamStats
from testbed.mesh.hbone.testcerts import TestPki


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Identities:
    pki = TestPki(Path(tmp_path_factory.mktemp("pki")))
    return Identities(pki, pki.identity("ns-b", "sa-b"), pki.identity("ns-a", "sa-a"))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_20mb_round_trip_intact(ids: Identities, loop: str) -> None:
    payload = os.urandom(20 << 20)

    async def main() -> bytes:
        async with upstream(echo_until_eof) as authority, tunnel(ids) as t:
            reader, writer, relay = await t.open(authority)

            async def send() -> None:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()  # END_STREAM -> the upstream sees EOF and closes

            sender = asyncio.create_task(send())
            echoed = await reader.read()  # until the upstream's EOF came back as END_STREAM
            await sender
            both_ways = StreamStats(len(payload), len(payload), reset=False)
            assert await relay == both_ways
            assert await asyncio.wait_for(t.closed.get(), 5) == both_ways
            writer.close()
            return echoed

    echoed = run(main(), loop)
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_request_carries_identity_and_headers(ids: Identities) -> None:
    async def main() -> None:
        async with upstream(echo_until_eof) as authority, tunnel(ids) as t:
            headers = {"baggage": "k8s.namespace.name=ns-a", "traceparent": "00-ab-cd-01"}
            _, writer, relay = await t.open(authority, source=("10.1.2.3", 4567), headers=headers)
            writer.close()
            await relay
            (request,) = t.requests
            assert request.peer_identity == ids.client.uri
            assert request.forwarded == 'for="10.1.2.3:4567"'
            assert request.forwarded_for == ("10.1.2.3", 4567)
            assert request.baggage == headers["baggage"]
            assert request.traceparent == headers["traceparent"]
            assert request.authority[0] == "127.0.0.1"
            assert request.local_address == t.server.address

    run(main())


def test_half_close_from_upstream_keeps_client_direction(ids: Identities) -> None:
    received = asyncio.Queue[bytes]()

    async def greet_then_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        writer.write_eof()  # upstream half-closes first
        await received.put(await reader.read())
        writer.close()

    async def main() -> tuple[bytes, bytes]:
        async with upstream(greet_then_read) as authority, tunnel(ids) as t:
            reader, writer, relay = await t.open(authority)
            greeting = await reader.read()  # EOF arrives: the upstream's FIN became END_STREAM
            writer.write(b"still flowing")  # the other direction still works
            writer.write_eof()
            got = await asyncio.wait_for(received.get(), 10)
            await relay
            return greeting, got

    assert run(main()) == (b"hello", b"still flowing")


def test_401_from_policy_callback(ids: Identities) -> None:
    async def main() -> None:
        async with upstream(echo_until_eof) as authority, tunnel(ids) as t:
            host, port = authority.rsplit(":", 1)
            t.deny.add((host, int(port)))
            with pytest.raises(HboneError) as failure:
                await t.open(authority)
            assert failure.value.status == 401

    run(main())


@pytest.mark.parametrize("authority", ["not-an-ip:80", "127.0.0.1", "127.0.0.1:0", "[::1:80"])
def test_400_for_a_bad_authority(ids: Identities, authority: str) -> None:
    async def main() -> None:
        async with tunnel(ids) as t:
            with pytest.raises(HboneError) as failure:
                await t.open(authority)
            assert failure.value.status == 400
            assert t.requests == []  # the callback never saw it

    run(main())


def test_503_when_upstream_refuses(ids: Identities) -> None:
    closed = listening_socket()
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now

    async def main() -> None:
        async with tunnel(ids) as t:
            with pytest.raises(HboneError) as failure:
                await t.open(f"127.0.0.1:{port}")
            assert failure.value.status == 503

    run(main())


def test_pool_reuses_a_connection_and_opens_another_when_full(ids: Identities) -> None:
    async def main() -> None:
        async with upstream(echo_until_eof) as authority, tunnel(ids, max_streams=2) as t:
            first = await t.open(authority)
            second = await t.open(authority)
            assert len(t.client.connections()) == 1
            assert len(t.server.connections) == 1
            third = await t.open(authority)
            assert len(t.client.connections()) == 2
            for reader, writer, relay in (first, second, third):
                writer.write(b"ping")
                writer.write_eof()
                assert await reader.read() == b"ping"
                await relay
            fourth = await t.open(authority)  # streams finished: room again on the first
            assert len(t.client.connections()) == 2
            fourth[1].close()
            await fourth[2]

    run(main())


def test_pool_keys_by_source_identity(ids: Identities) -> None:
    other = ids.pki.identity("ns-c", "sa-c")

    async def main() -> None:
        async with upstream(echo_until_eof) as authority, tunnel(ids) as t:
            await t.open(authority, source_identity=ids.client.uri)
            await t.open(authority, source_identity=other.uri, ssl_context=ids.client_ctx(other))
            assert len(t.client.connections()) == 2
            identities = sorted(request.peer_identity or "" for request in t.requests)
            assert identities == sorted([ids.client.uri, other.uri])

    run(main())


def test_upstream_reset_resets_the_client_side(ids: Identities) -> None:
    async def reset_after_greeting(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"bye")
        await writer.drain()
        await asyncio.sleep(0.1)
        reset(writer)

    async def main() -> None:
        async with upstream(reset_after_greeting) as authority, tunnel(ids) as t:
            reader, _, relay = await t.open(authority)
            assert await reader.readexactly(3) == b"bye"
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 10)
            assert (await relay).reset
            assert (await asyncio.wait_for(t.closed.get(), 5)).reset

    run(main())


def test_client_reset_resets_the_upstream(ids: Identities) -> None:
    outcome: asyncio.Queue[BaseException | bytes] = asyncio.Queue()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi")
        try:
            await outcome.put(await reader.read())
        except ConnectionResetError as exc:
            await outcome.put(exc)

    async def main() -> None:
        async with upstream(record) as authority, tunnel(ids) as t:
            reader, writer, relay = await t.open(authority)
            assert await reader.readexactly(2) == b"hi"
            reset(writer)
            assert isinstance(await asyncio.wait_for(outcome.get(), 10), ConnectionResetError)
            await relay

    run(main())


def test_a_stalled_stream_does_not_block_its_connection(ids: Identities) -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x" * (24 << 20))  # more than the connection window; nobody reads it
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with (
            upstream(flood) as flood_authority,
            upstream(echo_until_eof) as echo_authority,
            tunnel(ids) as t,
        ):
            stalled = await t.open(flood_authority)
            await asyncio.sleep(0.5)  # let the stalled stream use up its window
            reader, writer, relay = await t.open(echo_authority)
            assert len(t.client.connections()) == 1  # both streams share the connection
            writer.write(b"through")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b"through"
            await relay
            received = len(await asyncio.wait_for(stalled[0].read(), 20))
            assert received == 24 << 20  # and the stalled stream completes once read
            stalled[1].write_eof()
            await asyncio.wait_for(stalled[2], 5)

    run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_reset_during_a_flood_costs_only_its_stream(ids: Identities, loop: str) -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(200):
                writer.write(b"x" * (1 << 20))
                await writer.drain()
        writer.close()

    async def main() -> None:
        async with (
            upstream(flood) as flood_authority,
            upstream(echo_until_eof) as echo_authority,
            tunnel(ids) as t,
        ):
            reader, writer, relay = await t.open(echo_authority)
            flooded = await t.open(flood_authority)
            await flooded[0].readexactly(1 << 20)
            reset(flooded[1])  # writes to this socket now fail while DATA keeps coming
            assert (await asyncio.wait_for(flooded[2], 10)).reset
            writer.write(b"still here")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b"still here"
            await relay
            assert len(t.client.connections()) == 1

    run(main(), loop)
