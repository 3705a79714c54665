"""DNS for the testbed: the cluster DNS service (kube-dns's job) and ztunnel's DNS proxy.

Both answer A queries for service hostnames from a table they are given and NXDOMAIN for
every other name: nothing is forwarded, no query leaves the testbed. `answer` is sans-I/O
(query bytes in, response bytes out, dnspython for the wire format); `serve` is the thin
UDP and TCP driver around it, on sockets its caller made (ztunnel makes them inside a pod's
netns with SO_MARK 0x539).

The cluster DNS service answers fully qualified names only, as kube-dns does for a resolver
that has already applied its search list. ztunnel's proxy also expands a name through the
pod's search list (as Istio's ztunnel does: `<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc.cluster.local`),
in the order a resolver with that `ndots` would try them.

    python -m testbed.mesh.dns --config zone.json --listen 10.244.1.2:53
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from testbed.mesh.config import LocalConfig
from testbed.mesh.podsockets import INPOD_MARK, call_in_netns

PORT = 53
PROXY_PORT = 15053  # ztunnel's DNS proxy port inside a pod's netns
TTL = 30
CLUSTER_DOMAIN = "cluster.local"
MAX_TCP_MESSAGE = 65535


def search_list(namespace: str, domain: str = CLUSTER_DOMAIN) -> tuple[str, ...]:
    """The search list kubelet writes into a pod's resolv.conf."""
    return (f"{namespace}.svc.{domain}", f"svc.{domain}", domain)


def resolv_conf(nameserver: str, namespace: str, ndots: int = 5) -> str:
    """A pod's /etc/resolv.conf as kubelet writes it (dnsPolicy ClusterFirst)."""
    return (
        f"search {' '.join(search_list(namespace))}\n"
        f"nameserver {nameserver}\n"
        f"options ndots:{ndots}\n"
    )


@dataclass(frozen=True)
class Zone:
    """What a server answers: FQDN (lower case, no final dot) -> IPv4, and a search list."""

    records: Mapping[str, str]
    search: tuple[str, ...] = ()
    ndots: int = 1

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Zone:
        records = data.get("records", {})
        search = data.get("search", [])
        ndots = data.get("ndots", 1)
        if not isinstance(records, dict) or not isinstance(search, list):
            raise ValueError("zone: 'records' must be a map and 'search' a list")
        if not isinstance(ndots, int):
            raise ValueError("zone: 'ndots' must be an integer")
        return cls(
            {str(k).lower().rstrip("."): str(v) for k, v in records.items()},
            tuple(str(d) for d in search),
            ndots,
        )

    def to_json(self) -> dict[str, object]:
        return {"records": dict(self.records), "search": list(self.search), "ndots": self.ndots}


def candidates(name: str, search: Sequence[str], ndots: int) -> list[str]:
    """The names a resolver tries for `name`: as is first only with at least `ndots` dots."""
    name = name.lower().rstrip(".")
    expanded = [f"{name}.{domain}" for domain in search]
    return [name, *expanded] if name.count(".") >= ndots else [*expanded, name]


def lookup(zone: Zone, name: str) -> str | None:
    for candidate in candidates(name, zone.search, zone.ndots):
        if candidate in zone.records:
            return zone.records[candidate]
    return None


def proxy_zone(config: LocalConfig, namespace: str) -> Zone:
    """What ztunnel's DNS proxy answers for a pod of `namespace`: the config's services."""
    records = {s.hostname.lower(): str(s.vips[0].address) for s in config.services if s.vips}
    return Zone(records, search_list(namespace), ndots=5)


def answer(query: bytes, zone: Zone) -> bytes | None:
    """The response to one DNS message; None if it is too short to carry an id."""
    try:
        request = dns.message.from_wire(query)
    except dns.exception.DNSException:
        return _error_reply(query, dns.rcode.FORMERR)
    if request.flags & dns.flags.QR:
        return None  # a response sent to us: never answer one (no reflection loops)
    if request.opcode() != dns.opcode.QUERY:
        return _error_reply(query, dns.rcode.NOTIMP)
    if len(request.question) != 1:
        return _error_reply(query, dns.rcode.FORMERR)
    reply = dns.message.make_response(request)
    reply.flags |= dns.flags.AA
    reply.flags &= ~dns.flags.RA  # recursion is not offered: nothing is forwarded
    question = request.question[0]
    address = (
        lookup(zone, question.name.to_text()) if question.rdclass == dns.rdataclass.IN else None
    )
    if address is None:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    elif question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
        reply.answer.append(
            dns.rrset.from_text(question.name, TTL, dns.rdataclass.IN, dns.rdatatype.A, address)
        )
    # any other type of an existing name: NOERROR with no answers (NODATA)
    wire: bytes = reply.to_wire()
    return wire


def _error_reply(query: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
    """A header-only reply with the query's id (the question may be unparseable)."""
    if len(query) < 2:
        return None
    (query_id,) = struct.unpack("!H", query[:2])
    reply = dns.message.Message(id=query_id)
    reply.flags = dns.flags.QR
    reply.set_rcode(rcode)
    wire: bytes = reply.to_wire()
    return wire


# ---------------------------------------------------------------- I/O driver


ZoneSource = Callable[[str], Zone]
"""The zone for a query from this client address, read per query so that a config reload
applies to a running server (a shared ztunnel answers each pod with its namespace's list)."""


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, zone: ZoneSource) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        reply = answer(data, self.zone(str(addr[0])))
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def _tcp_client(
    zone: ZoneSource, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """RFC 7766: each message has a 2-byte length; garbage closes this connection only."""
    peer = str(writer.get_extra_info("peername")[0])
    try:
        while True:
            length = struct.unpack("!H", await reader.readexactly(2))[0]
            reply = answer(await reader.readexactly(length), zone(peer))
            if reply is None:
                break
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve(zone: ZoneSource, udp: socket.socket, tcp: socket.socket) -> None:
    """Answer on a bound UDP socket and a listening TCP socket until cancelled."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(zone), sock=udp)
    server = await asyncio.start_server(lambda r, w: _tcp_client(zone, r, w), sock=tcp)
    try:
        async with server:
            await server.serve_forever()
    finally:
        transport.close()


async def serve_in_netns(netns_fd: int, zone: ZoneSource) -> None:
    """ztunnel's DNS proxy for one pod: 127.0.0.1:15053 in its netns, sockets marked 0x539
    (the pod's DNS capture rules redirect port 53 there and let the marked ones pass)."""
    udp, tcp = await asyncio.to_thread(
        call_in_netns, netns_fd, lambda: bind_sockets("127.0.0.1", PROXY_PORT, INPOD_MARK)
    )
    await serve(zone, udp, tcp)


def bind_sockets(
    host: str, port: int, mark: int | None = None
) -> tuple[socket.socket, socket.socket]:
    """A UDP and a listening TCP socket on host:port (in the caller's netns), marked if asked."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    for sock in (udp, tcp):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.bind((host, port))
        sock.setblocking(False)
    tcp.listen(128)
    return udp, tcp


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="testbed.mesh.dns", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="zone JSON file")
    parser.add_argument("--listen", default=f"0.0.0.0:{PORT}", help="HOST:PORT (UDP and TCP)")
    args = parser.parse_args(argv)
    zone = Zone.from_json(json.loads(args.config.read_text(encoding="utf-8")))
    host, _, port = args.listen.rpartition(":")
    udp, tcp = bind_sockets(host, int(port))
    print(f"dns: {len(zone.records)} names on {args.listen} (udp, tcp)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(lambda _peer: zone, udp, tcp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
