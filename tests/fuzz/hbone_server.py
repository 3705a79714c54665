"""A real HBONE server (testbed.mesh.hbone) for the HBONE fuzz target, in its own process so
that a crash shows as its exit and its memory is measured alone.

    python hbone_server.py PKI_DIR   -> prints "<hbone port> <echo port>", serves until killed

CONNECT is accepted only to its own echo upstream on loopback (anything else gets 401), so
fuzzed authorities never reach another service on this machine.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

from fuzz_support import end_with_parent

from testbed.mesh.hbone import ConnectDecision, ConnectRequest, HboneServer, connect_tcp
from testbed.mesh.hbone import server_context as make_server_context
from testbed.mesh.hbone.testcerts import Identity


def server_identity(pki: Path) -> Identity:
    stem = pki / "ns-b.sa-b"
    uri = "spiffe://cluster.local/ns/ns-b/sa/sa-b"
    return Identity(Path(f"{stem}.cert.pem"), Path(f"{stem}.key.pem"), pki / "root-cert.pem", uri)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(pki: Path) -> None:
    upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
    echo_address = upstream.sockets[0].getsockname()[:2]

    async def on_connect(request: ConnectRequest) -> ConnectDecision:
        if tuple(request.authority) != tuple(echo_address):
            return ConnectDecision.reject(401)
        return ConnectDecision.accept(await connect_tcp(request.authority))

    identity = server_identity(pki)
    server = HboneServer(
        make_server_context(identity.cert, identity.key, identity.roots), on_connect
    )
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    await server.start(listener)
    print(server.address[1], echo_address[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    end_with_parent()
    asyncio.run(main(Path(sys.argv[1])))
