"""HTTP requests and responses as the waypoint handles them: whole messages, independent of
the HTTP version they came in (bodies are buffered; the testbed's payloads are small)."""

from __future__ import annotations

import http
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

MAX_BODY_SIZE = 16 << 20
MAX_HEADER_BYTES = 16 << 10
# Per-connection headers (RFC 9110 7.6.1) and framing: each hop sets its own.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "upgrade",
        "trailer",
        "content-length",
        "host",
        "expect",  # 100-continue is answered by the waypoint itself
    }
)
REASONS = {status.value: status.phrase for status in http.HTTPStatus}  # standard phrases


@dataclass
class HttpRequest:
    method: str
    target: str  # path and query
    authority: str  # Host / :authority
    headers: list[tuple[str, str]]  # lowercase names, end-to-end only
    body: bytes = b""
    protocol: str = "HTTP/1.1"  # or "HTTP/2"


@dataclass
class HttpResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    flags: str = "-"  # Envoy's response flags: UF, UT, FI, NR, UH, RBAC, ... ("-": none)
    upstream: str = "-"  # the endpoint that answered, for the access log

    @classmethod
    def local(cls, status: int, text: str, flags: str = "-") -> HttpResponse:
        """A response the waypoint makes itself (Envoy's local replies are text/plain)."""
        return cls(status, [("content-type", "text/plain")], text.encode(), flags)


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


def end_to_end(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Lowercase names, hop-by-hop headers (and those `connection` names) left out."""
    pairs = [(name.lower(), value) for name, value in headers]
    named = {
        token.strip().lower()
        for name, value in pairs
        if name == "connection"
        for token in value.split(",")
    }
    return [(n, v) for n, v in pairs if n not in HOP_BY_HOP and n not in named]
