"""The plain TCP passthrough relay (os.splice) and connect_tcp."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from hbone_support import echo_until_eof, listening_socket, reset, run, tcp_pair, upstream

from testbed.mesh.hbone import connect_tcp, parse_authority, relay_tcp


async def relayed_client(
    authority: str,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[None]]:
    """A client connection relayed by relay_tcp to the server at `authority`."""
    ours, accepted = await tcp_pair()
    server_side = await connect_tcp(parse_authority(authority))
    relay = asyncio.create_task(relay_tcp(accepted, server_side))
    reader, writer = await asyncio.open_connection(sock=ours)
    return reader, writer, relay


def test_relay_moves_bytes_intact_and_forwards_half_close() -> None:
    payload = os.urandom(20 << 20)

    async def main() -> bytes:
        async with upstream(echo_until_eof) as authority:
            reader, writer, relay = await relayed_client(authority)

            async def send() -> None:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            echoed = await reader.read()
            await sender
            await asyncio.wait_for(relay, 10)
            writer.close()
            return echoed

    assert hashlib.sha256(run(main())).digest() == hashlib.sha256(payload).digest()


def test_relay_propagates_a_reset() -> None:
    async def reset_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        reset(writer)

    async def main() -> None:
        async with upstream(reset_at_once) as authority:
            reader, writer, relay = await relayed_client(authority)
            writer.write(b"x")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 10)
            await asyncio.wait_for(relay, 10)

    run(main())


def test_connect_tcp_raises_when_refused() -> None:
    closed = listening_socket()
    address = closed.getsockname()
    closed.close()

    async def main() -> None:
        with pytest.raises(ConnectionRefusedError):
            await connect_tcp(address)

    run(main())
