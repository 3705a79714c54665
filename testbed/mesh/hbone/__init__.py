"""HBONE: HTTP/2 CONNECT over mutual TLS 1.3 (ALPN h2), as Istio's ztunnel speaks it.

Inbound (a server on a listening socket the caller created, e.g. inside a pod netns):

    async def on_connect(req: ConnectRequest) -> ConnectDecision:
        # req.authority (ip, port), req.peer_identity (SPIFFE URI of the client certificate),
        # req.peer_address, req.local_address, req.forwarded / .forwarded_for / .baggage /
        # .traceparent, req.headers
        if not allowed(req):
            return ConnectDecision.reject(STATUS_UNAUTHORIZED)           # 401
        upstream = await connect_tcp(req.authority, source=(client_ip, 0), transparent=True)
        return ConnectDecision.accept(upstream, on_closed=record)        # OSError -> 503

    server = HboneServer(server_context(cert, key, roots), on_connect)
    await server.start(listen_sock)          # 400 for non-CONNECT / bad authority, no callback
    await server.close()

Outbound (a client with a connection pool; one stream per captured connection):

    client = HboneClient(socket_factory=make_socket_in_pod_netns)   # optional factory
    stream = await client.open((dst_pod_ip, 15008), "10.0.0.7:8080", ssl_context=ctx,
                               expected_identities={server_uri}, source_identity=my_uri,
                               source=client_addr, headers={"traceparent": ...})
    stats = await stream.relay(accepted_socket)   # StreamStats once both directions closed

`open` raises HboneError (`.status` set for a non-200 answer; a server whose URI SAN is not
expected fails the connection). Passthrough TCP: `await relay_tcp(accepted, await
connect_tcp(dest))` (os.splice in two threads). Works on asyncio and uvloop event loops.

Layers: `protocol.HboneProtocol` is the whole HTTP/2 CONNECT state machine, sans I/O
(`receive_data(bytes) -> events`, `data_to_send()`; framing, SETTINGS, flow control, stream
states, resets); `connection.TunnelConnection` is its asyncio driver: one protocol per TLS
connection, an SSLObject over MemoryBIOs with 1 MiB reads decrypted into pooled buffers.
DATA frames are written from 9 bytes of headroom in the socket read buffer and parsed as
memoryview slices. Windows are Istio's (stream 4 MiB, connection 16 MiB; 1 MiB frames); a
stream's credit goes back as bytes arrive while at most 4 MiB wait for a slow app socket,
batched (>= 1 MiB) into the flush of each receive batch. TLS 1.3 prefers AES-128-GCM.
SETTINGS, their limits (server: 200 streams, 64 KiB of headers; client: 16 KiB, no push), the
PING keepalive (10 s, dead after 20 s without an ACK) and the pool's release of connections
unused for 5 minutes are Istio's; `HboneTimers` (from the environment by default) shortens
the timers for tests.
Server and client tune glibc malloc once so 1 MiB buffers are reused (see memory.py).

Modules: events + protocol (sans-I/O HTTP/2), frames (framing), flow (window accounting),
timers (keepalive and pool timers), tls (contexts, SANs, TlsSession), connect (requests,
decisions), connection + stream (the asyncio driver), server, client, relay (plain TCP),
memory (buffer pool), testcerts (throwaway PKI for tests and benchmarks).
"""

from .client import HboneClient, HboneStream
from .connect import (
    STATUS_BAD_REQUEST,
    STATUS_OK,
    STATUS_UNAUTHORIZED,
    STATUS_UNAVAILABLE,
    ConnectDecision,
    ConnectRequest,
    StreamStats,
    parse_authority,
    spiffe_parts,
)
from .connection import HboneError
from .relay import connect_tcp, relay_tcp, reset_socket
from .server import HboneServer
from .timers import HboneTimers
from .tls import client_context, server_context, uri_sans

__all__ = [
    "STATUS_BAD_REQUEST",
    "STATUS_OK",
    "STATUS_UNAUTHORIZED",
    "STATUS_UNAVAILABLE",
    "ConnectDecision",
    "ConnectRequest",
    "HboneClient",
    "HboneError",
    "HboneServer",
    "HboneStream",
    "HboneTimers",
    "StreamStats",
    "client_context",
    "connect_tcp",
    "parse_authority",
    "relay_tcp",
    "reset_socket",
    "server_context",
    "spiffe_parts",
    "uri_sans",
]
