"""HBONE CONNECT requests and decisions: header building and validation, socket-free.

A request is a plain HTTP/2 CONNECT (`:method CONNECT`, `:authority ip:port`, no `:scheme` or
`:path`) carrying `forwarded: for="<src ip:port>"`, `baggage` and `traceparent`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from testbed.netlab.errors import TestbedError

STATUS_OK = 200
STATUS_BAD_REQUEST = 400
STATUS_UNAUTHORIZED = 401
STATUS_UNAVAILABLE = 503

Address = tuple[str, int]


class BadRequest(TestbedError, ValueError):
    """The request is not a valid HBONE CONNECT (answered with 400)."""


def parse_authority(authority: str) -> Address:
    """`"10.0.0.1:80"` or `"[fd00::1]:80"` -> (ip, port); raises BadRequest otherwise."""
    host, sep, port_text = authority.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError as exc:
        raise BadRequest(f"authority {authority!r} is not ip:port") from exc
    if not sep or not 0 < port < 65536 or (ip.version == 6) != ("[" in authority):
        raise BadRequest(f"authority {authority!r} is not ip:port")
    return str(ip), port


def format_address(address: Address) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def spiffe_parts(identity: str) -> tuple[str, str, str] | None:
    """`spiffe://<td>/ns/<ns>/sa/<sa>` -> (trust domain, namespace, service account)."""
    prefix = "spiffe://"
    if not identity.startswith(prefix):
        return None
    trust_domain, _, path = identity[len(prefix) :].partition("/")
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        return None
    return trust_domain, parts[1], parts[3]


@dataclass(frozen=True)
class ConnectRequest:
    """What the server's `on_connect` callback decides on."""

    authority: Address
    peer_identity: str | None  # the client certificate's SPIFFE URI SAN
    peer_address: Address  # the TCP peer of the HBONE connection
    local_address: Address = ("", 0)  # where it arrived (e.g. <pod ip>:15008)
    headers: dict[str, str] = field(default_factory=dict)  # regular (non-pseudo) headers

    @property
    def forwarded(self) -> str | None:
        return self.headers.get("forwarded")

    @property
    def forwarded_for(self) -> Address | None:
        """The original client address from `forwarded: for="ip:port"`, if well formed."""
        value = self.forwarded or ""
        for element in value.split(";"):
            key, _, raw = element.strip().partition("=")
            if key.lower() == "for":
                try:
                    return parse_authority(raw.strip('"'))
                except BadRequest:
                    return None
        return None

    @property
    def baggage(self) -> str | None:
        return self.headers.get("baggage")

    @property
    def traceparent(self) -> str | None:
        return self.headers.get("traceparent")


@dataclass(frozen=True)
class StreamStats:
    """How a relayed stream ended: bytes written to and read from its socket, whether it
    ended with a reset (RST_STREAM or a TCP reset) rather than two half-closes, and `error`:
    why its HBONE connection failed under it, if it did (e.g. the peer stopped answering
    PINGs)."""

    to_socket: int
    from_socket: int
    reset: bool
    error: str | None = None


@dataclass(frozen=True)
class ConnectDecision:
    """Either `accept(upstream_socket)` (answered 200) or `reject(status)`.

    `on_closed` (accepted streams only) is called with the StreamStats once the relay ends."""

    status: int
    upstream: socket.socket | None = None
    on_closed: Callable[[StreamStats], None] | None = None

    @classmethod
    def accept(
        cls, upstream: socket.socket, on_closed: Callable[[StreamStats], None] | None = None
    ) -> ConnectDecision:
        return cls(STATUS_OK, upstream, on_closed)

    @classmethod
    def reject(cls, status: int) -> ConnectDecision:
        if status == STATUS_OK:
            raise ValueError("a rejection needs a non-200 status")
        return cls(status)


def request_headers(
    authority: str, source: Address | None, extra: dict[str, str] | None
) -> list[tuple[str, str]]:
    headers = [(":method", "CONNECT"), (":authority", authority)]
    if source is not None:
        headers.append(("forwarded", f'for="{format_address(source)}"'))
    headers.extend((name.lower(), value) for name, value in (extra or {}).items())
    return headers


def parse_request(
    headers: list[tuple[str, str]],
    peer_identity: str | None,
    peer_address: Address,
    local_address: Address = ("", 0),
) -> ConnectRequest:
    """Validate a received request header list; raises BadRequest (-> 400)."""
    pseudo = {name: value for name, value in headers if name.startswith(":")}
    if pseudo.get(":method") != "CONNECT":
        raise BadRequest(f"method {pseudo.get(':method')!r} is not CONNECT")
    if ":scheme" in pseudo or ":path" in pseudo or ":protocol" in pseudo:
        raise BadRequest("HBONE uses plain CONNECT (no :scheme, :path or :protocol)")
    authority = parse_authority(pseudo.get(":authority", ""))
    regular = {name: value for name, value in headers if not name.startswith(":")}
    return ConnectRequest(authority, peer_identity, peer_address, local_address, regular)


def response_status(headers: list[tuple[str, str]]) -> int:
    for name, value in headers:
        if name == ":status" and value.isdigit():
            return int(value)
    raise BadRequest("response without a :status")
