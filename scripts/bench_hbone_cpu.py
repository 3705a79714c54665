#!/usr/bin/env python3
"""CPU cost of the HBONE data path in one process on loopback: CPU seconds per GB.

CPU time, unlike throughput, hardly moves with other people's load on a shared 2-vCPU
machine, so this is the figure to compare two versions of the code with (run it with
PYTHONPATH pointing at the other tree for the A/B). It sends `--mib` MiB through
HboneClient -> HboneServer -> a sink that may pause (`--pause-every`), then prints the CPU
seconds per GB of the whole process (both proxies and both apps), the wall time, the
negotiated TLS suite and how many decrypt buffers memory.py allocated.

    .venv/bin/python scripts/bench_hbone_cpu.py [--mib 512] [--pause-every 0]
    .venv/bin/python scripts/bench_hbone_cpu.py --ciphers   # AES-128 vs AES-256 alone
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from testbed.mesh.hbone import (
    ConnectDecision,
    ConnectRequest,
    HboneClient,
    HboneServer,
    client_context,
    connect_tcp,
    memory,
    server_context,
)
from testbed.mesh.hbone.connect import StreamStats
from testbed.mesh.hbone.testcerts import TestPki

CHUNK = 1 << 20
_made = [0]


def _counting_bytearray(size: int = 0) -> bytearray:
    """Counts the buffers memory.py allocates (old and new code both allocate there)."""
    _made[0] += 1
    return bytearray(size)


memory.bytearray = _counting_bytearray  # type: ignore[attr-defined]


def _listen() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


async def _tunnel(
    pki: TestPki, app: asyncio.Server
) -> tuple[
    HboneServer,
    HboneClient,
    asyncio.Task[StreamStats],
    tuple[asyncio.StreamReader, asyncio.StreamWriter],
]:
    """An HBONE server and client on loopback with one stream to `app`, relayed to a
    socketpair whose far end is returned as (reader, writer)."""
    server_id, client_id = pki.identity("ns-b", "sa-b"), pki.identity("ns-a", "sa-a")

    async def on_connect(request: ConnectRequest) -> ConnectDecision:
        return ConnectDecision.accept(await connect_tcp(request.authority))

    server = HboneServer(server_context(server_id.cert, server_id.key, pki.roots), on_connect)
    await server.start(_listen())
    client = HboneClient()
    stream = await client.open(
        server.address,
        f"127.0.0.1:{app.sockets[0].getsockname()[1]}",
        ssl_context=client_context(client_id.cert, client_id.key, pki.roots),
        expected_identities={server_id.uri},
    )
    ours, theirs = socket.socketpair()
    relay = asyncio.create_task(stream.relay(theirs))
    return server, client, relay, await asyncio.open_connection(sock=ours)


async def transfer(mib: int, pause_every: int, certs: Path) -> dict[str, object]:
    pki = TestPki(certs)
    received = 0
    done = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        while chunk := await reader.read(CHUNK):
            received += len(chunk)
            if pause_every and received // (pause_every << 20) != (received - len(chunk)) // (
                pause_every << 20
            ):
                await asyncio.sleep(0.05)  # a slow app: stops reading for a moment
        writer.close()
        done.set()

    app = await asyncio.start_server(sink, sock=_listen())
    server, client, relay, (_, writer) = await _tunnel(pki, app)
    block = b"x" * CHUNK
    cpu0, wall0 = time.process_time(), time.monotonic()
    for _ in range(mib):
        writer.write(block)
        await writer.drain()
    writer.write_eof()
    await done.wait()
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    conn = next(iter(server.connections))
    result: dict[str, object] = {
        "MiB": mib,
        "cpu_s_per_GB": round(cpu / (mib / 1024), 3),
        "wall_s": round(wall, 2),
        "Gbit/s": round(mib * 8 * 1.048576e-3 / wall, 2),
        "suite": conn.tls.cipher(),
        "decrypt_buffers_allocated": _made[0],
    }
    writer.close()
    await relay
    await client.close()
    await server.close()
    app.close()
    return result


async def new_streams(count: int, certs: Path) -> dict[str, object]:
    """`count` sequential CONNECTs, each carrying 64 B there and back, then closed."""
    pki = TestPki(certs)
    server_id, client_id = pki.identity("ns-b", "sa-b"), pki.identity("ns-a", "sa-a")

    async def pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(64))
        await writer.drain()
        writer.close()

    app = await asyncio.start_server(pong, sock=_listen())
    authority = f"127.0.0.1:{app.sockets[0].getsockname()[1]}"

    async def on_connect(request: ConnectRequest) -> ConnectDecision:
        return ConnectDecision.accept(await connect_tcp(request.authority))

    server = HboneServer(server_context(server_id.cert, server_id.key, pki.roots), on_connect)
    await server.start(_listen())
    client = HboneClient()
    context = client_context(client_id.cert, client_id.key, pki.roots)
    cpu0, wall0 = time.process_time(), time.monotonic()
    for _ in range(count):
        stream = await client.open(
            server.address, authority, ssl_context=context, expected_identities={server_id.uri}
        )
        ours, theirs = socket.socketpair()
        relay = asyncio.create_task(stream.relay(theirs))
        reader, writer = await asyncio.open_connection(sock=ours)
        writer.write(b"p" * 64)
        await reader.readexactly(64)
        writer.close()
        await relay
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    await client.close()
    await server.close()
    app.close()
    return {"streams": count, "cpu_us_per_stream": round(cpu / count * 1e6), "per_s": round(
        count / wall)}  # fmt: skip


async def ping_pong(count: int, certs: Path) -> dict[str, object]:
    """`count` 64 B round trips on one stream: CPU and wall time per round trip."""
    pki = TestPki(certs)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(64):
            writer.write(data)
        writer.close()

    app = await asyncio.start_server(echo, sock=_listen())
    server, client, relay, (reader, writer) = await _tunnel(pki, app)
    cpu0, wall0 = time.process_time(), time.monotonic()
    for _ in range(count):
        writer.write(b"r" * 64)
        await reader.readexactly(64)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    writer.close()
    await relay
    await client.close()
    await server.close()
    app.close()
    return {"round_trips": count, "cpu_us_each": round(cpu / count * 1e6, 1),
            "wall_us_each": round(wall / count * 1e6, 1)}  # fmt: skip


def cipher_cost(suite: str, mib: int = 256) -> float:
    """CPU s/GB to encrypt and decrypt with TLS 1.3 `suite` alone (memory BIOs, 16 KiB records)."""
    with tempfile.TemporaryDirectory() as tmp:
        pki = TestPki(Path(tmp))
        s_id, c_id = pki.identity("ns-b", "sa-b"), pki.identity("ns-a", "sa-a")
        s_ctx = server_context(s_id.cert, s_id.key, pki.roots)
        c_ctx = client_context(c_id.cert, c_id.key, pki.roots)
    for ctx in (s_ctx, c_ctx):
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    from testbed.mesh.hbone import tls

    lib = tls._openssl()
    assert lib is not None
    for ctx in (s_ctx, c_ctx):
        pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        lib.SSL_CTX_set_ciphersuites(pointer, suite.encode())
    bios = [ssl.MemoryBIO() for _ in range(4)]
    server = s_ctx.wrap_bio(bios[0], bios[1], server_side=True)
    client = c_ctx.wrap_bio(bios[2], bios[3])
    for _ in range(10):  # the handshake, by hand
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        bios[0].write(bios[3].read())
        bios[2].write(bios[1].read())
    cipher = client.cipher()
    assert cipher is not None and cipher[0] == suite, cipher
    block = memoryview(b"y" * CHUNK)
    buffer = bytearray(CHUNK + 65536)
    cpu0 = time.process_time()
    for _ in range(mib):
        client.write(block)
        bios[0].write(bios[3].read())
        got = 0
        while got < CHUNK:
            read = server.read(len(buffer), buffer)
            assert isinstance(read, int)
            got += read
    return (time.process_time() - cpu0) / (mib / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--pause-every", type=int, default=0, metavar="MIB")
    parser.add_argument("--ciphers", action="store_true")
    parser.add_argument("--streams", type=int, default=0, help="time N new streams instead")
    parser.add_argument("--pingpong", type=int, default=0, help="time N 64 B round trips")
    args = parser.parse_args()
    if args.ciphers:
        for suite in ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"):
            print(f"{suite}: {cipher_cost(suite):.3f} CPU s/GB (encrypt + decrypt)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.pingpong:
            print(uvloop.run(ping_pong(args.pingpong, Path(tmp))), flush=True)
        elif args.streams:
            print(uvloop.run(new_streams(args.streams, Path(tmp))), flush=True)
        else:
            print(uvloop.run(transfer(args.mib, args.pause_every, Path(tmp))), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
