"""A receiving app that stops reading for 2 s mid-transfer, through a real HBONE client and
server on loopback (TLS, HTTP/2 CONNECT, sockets): memory stays bounded while it sleeps and
the transfer resumes and completes intact."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
from hbone_support import Identities, run, tunnel, upstream

from testbed.mesh.hbone.protocol import STREAM_BUFFER_LIMIT, STREAM_WINDOW
from testbed.mesh.hbone.testcerts import TestPki

PAYLOAD = os.urandom(48 << 20)
PAUSE = 2.0


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Identities:
    pki = TestPki(Path(tmp_path_factory.mktemp("pki")))
    return Identities(pki, pki.identity("ns-b", "sa-b"), pki.identity("ns-a", "sa-a"))


def test_transfer_survives_a_2s_stall_of_the_receiving_app(ids: Identities) -> None:
    paused = asyncio.Event()
    peak_buffered: list[int] = []

    async def slow_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        digest.update(await reader.readexactly(4 << 20))
        paused.set()
        await asyncio.sleep(PAUSE)  # the app reads nothing: the tunnel must hold back
        while chunk := await reader.read(1 << 20):
            digest.update(chunk)
        writer.write(digest.hexdigest().encode())
        await writer.drain()
        writer.close()

    async def main() -> tuple[str, float]:
        async with upstream(slow_app) as authority, tunnel(ids) as t:
            reader, writer, relay = await t.open(authority)
            loop = asyncio.get_running_loop()

            async def send() -> float:
                writer.write(PAYLOAD)
                await writer.drain()
                writer.write_eof()
                return loop.time()

            sender = asyncio.create_task(send())
            await paused.wait()
            stalled_at = loop.time()
            for _ in range(15):  # sample the server's streams while the app sleeps
                await asyncio.sleep(PAUSE / 20)
                for conn in t.server.connections:
                    peak_buffered.extend(s.receive.buffered for s in conn.proto.streams.values())
            finished = await asyncio.wait_for(sender, 30)
            answer = (await asyncio.wait_for(reader.read(), 30)).decode()
            await relay
            writer.close()
            return answer, finished - stalled_at

    answer, sent_after = run(main())
    assert answer == hashlib.sha256(PAYLOAD).hexdigest()
    assert sent_after >= PAUSE * 0.9  # the sender was held back by the stall, not buffered away
    assert peak_buffered and max(peak_buffered) > 0
    assert max(peak_buffered) <= STREAM_WINDOW + STREAM_BUFFER_LIMIT
