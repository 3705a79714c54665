"""A Service port's declared application protocol (Kubernetes `appProtocol`), as Istio reads it.

Istio's explicit protocol selection: a port's `appProtocol` (or, failing that, its name's
prefix) names the protocol, case-insensitively. `http`, `http2`, `grpc` and `grpc-web` are
HTTP: the L7 proxy (a sidecar, a waypoint) serves the port as HTTP without sniffing.
`tcp`, and the protocols a sidecar does not terminate (`https` and `tls`: it does not
decrypt; `mongo`, `mysql`, `redis`: experimental filters, off by default) are opaque TCP,
proxied at L4 even if the bytes look like HTTP. An undeclared port is sniffed: HTTP/1.1
and HTTP/2 are recognised from the first bytes, anything else is TCP.
"""

from __future__ import annotations

from typing import Literal, cast, get_args

AppProtocol = Literal["http", "http2", "grpc", "grpc-web", "https", "tls", "tcp", "mongo",
                      "mysql", "redis"]  # fmt: skip
APP_PROTOCOLS: tuple[str, ...] = get_args(AppProtocol)
HTTP_APP_PROTOCOLS = frozenset({"http", "http2", "grpc", "grpc-web"})
Handling = Literal["http", "tcp", "sniff"]


def normalize(value: object) -> AppProtocol | None:
    """`value` as Istio reads it (lowercase), or None when Istio does not know it."""
    lowered = value.lower() if isinstance(value, str) else ""
    return cast(AppProtocol, lowered) if lowered in APP_PROTOCOLS else None


def handling(app_protocol: str | None) -> Handling:
    """How an L7 proxy treats a connection to a port that declares `app_protocol`."""
    if app_protocol is None:
        return "sniff"
    return "http" if app_protocol.lower() in HTTP_APP_PROTOCOLS else "tcp"
