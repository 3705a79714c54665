"""The L7 proxies' way to endpoints: HBONE to `<pod ip>:15008` with the proxy's certificate,
CONNECT to `<pod ip>:<target port>`, then HTTP over the tunnel: HTTP/2 (prior knowledge) for
requests that came in over HTTP/2, HTTP/1.1 keep-alive for the rest, as Envoy keeps the
client's protocol.

HBONE connections are pooled by the HboneClient (many CONNECT streams per connection); on
top, finished HTTP/1.1 exchanges leave their stream idle for the next request to the same
endpoint, and one HTTP/2 connection per endpoint carries all its HTTP/2 requests, so a
steady load opens no new streams. A stream is a socket pair: one end is
relayed by the HBONE stream, the other speaks HTTP through asyncio streams. The CONNECT
carries no `forwarded` client address: as with Istio, the app sees the proxy as its peer.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

from testbed.mesh.hbone import HboneClient, HboneError, StreamStats
from testbed.mesh.hbone.connect import format_address
from testbed.mesh.waypoint import HBONE_PORT
from testbed.mesh.waypoint.http1 import Http1Client, UpstreamClosed, open_streams
from testbed.mesh.waypoint.http2 import Http2Client
from testbed.mesh.waypoint.messages import HttpRequest, HttpResponse
from testbed.mesh.waypoint.proxy import Address, Endpoint, UpstreamConnectError

log = logging.getLogger(__name__)
MAX_IDLE_PER_ENDPOINT = 64
TunnelAddress = Callable[[Endpoint], Address]


def pod_tunnel_address(endpoint: Endpoint) -> Address:
    """Where an endpoint's HBONE is served: its pod IP, port 15008."""
    return str(endpoint[0].workload_ips[0]), HBONE_PORT


class HboneUpstreams:
    def __init__(
        self,
        client: HboneClient,
        ssl_context: ssl.SSLContext,
        identity: str,
        tunnel_address: TunnelAddress = pod_tunnel_address,
    ) -> None:
        """`tunnel_address` maps an endpoint to its HBONE server (tests put them on loopback)."""
        self.client = client
        self.ssl_context = ssl_context
        self.identity = identity
        self.tunnel_address = tunnel_address
        self._idle: dict[Address, list[Http1Client]] = {}
        self._h2: dict[Address, Http2Client] = {}
        self._h2_opening: dict[Address, asyncio.Lock] = {}
        self._relays: set[asyncio.Task[StreamStats]] = set()

    async def open_socket(self, endpoint: Endpoint) -> socket.socket:
        """A local socket whose peer is a fresh CONNECT stream to the endpoint."""
        workload, port = endpoint
        ip = str(workload.workload_ips[0])
        try:
            stream = await self.client.open(
                self.tunnel_address(endpoint),
                format_address((ip, port)),
                ssl_context=self.ssl_context,
                expected_identities={workload.identity.uri},
                source_identity=self.identity,
            )
        except HboneError as exc:
            raise UpstreamConnectError(str(exc)) from exc
        ours, theirs = socket.socketpair()
        relay = asyncio.get_running_loop().create_task(stream.relay(theirs))
        self._relays.add(relay)
        relay.add_done_callback(self._relays.discard)
        return ours

    async def exchange(self, endpoint: Endpoint, request: HttpRequest) -> HttpResponse:
        key = (str(endpoint[0].workload_ips[0]), endpoint[1])
        if request.protocol == "HTTP/2":
            return await (await self._h2_client(key, endpoint)).exchange(request)
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.reusable:
                conn.close()
                continue
            try:
                return await self._exchange_on(key, conn, request)
            except UpstreamClosed:
                log.debug("idle upstream connection to %s was closed; opening another", key)
        streams = await open_streams(await self.open_socket(endpoint))
        return await self._exchange_on(key, Http1Client(*streams), request)

    async def _h2_client(self, key: Address, endpoint: Endpoint) -> Http2Client:
        """The endpoint's HTTP/2 connection, opened once however many requests wait for it."""
        async with self._h2_opening.setdefault(key, asyncio.Lock()):
            conn = self._h2.get(key)
            if conn is None or not conn.reusable:
                if conn is not None:
                    conn.close()
                streams = await open_streams(await self.open_socket(endpoint))
                conn = self._h2[key] = Http2Client(*streams)
            return conn

    async def _exchange_on(
        self, key: Address, conn: Http1Client, request: HttpRequest
    ) -> HttpResponse:
        try:
            response = await conn.exchange(request)
        except BaseException:  # broken, or cancelled mid-exchange: never reuse it
            conn.close()
            raise
        idle = self._idle.setdefault(key, [])
        if conn.reusable and len(idle) < MAX_IDLE_PER_ENDPOINT:
            idle.append(conn)
        else:
            conn.close()
        return response

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for h2_conn in self._h2.values():
            h2_conn.close()
        self._h2.clear()
        for relay in list(self._relays):
            relay.cancel()
        await self.client.close()
