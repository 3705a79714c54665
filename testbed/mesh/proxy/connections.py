"""Connection records: what a proxy did with each connection it handled, for `GET
/connections` on its admin port (the trace tooling walks a request through them).

Each proxy keeps its last 1000 records, open ones included. A record is created when the
proxy has decided what to do with a connection and is finished (`close`) when it ends or
was refused; `since` gives those with a larger id, so a reader can poll for new ones.

    {"connections": [{"id": 7, "proxy": "ztunnel", "listener": 15001,
      "direction": "outbound", "peer": "10.244.1.2:40312", "original_dst": "10.96.0.10:80",
      "src_identity": "spiffe://...", "dst_identity": "spiffe://...",
      "connect_target": "10.244.2.3:8080", "upstream": "10.244.2.3:15008", "path": "hbone",
      "verdict": "allow", "reason": null, "bytes_sent": 120, "bytes_received": 4096,
      "opened": 1764612345.12, "closed": 1764612345.31}]}
"""

from __future__ import annotations

import itertools
import json
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

ProxyKind = Literal["ztunnel", "waypoint", "sidecar"]
Direction = Literal["outbound", "inbound"]
Path = Literal["hbone", "passthrough", "waypoint", "plaintext", "l7", "local"]  # local: fast path
Verdict = Literal["allow", "deny", "error"]
Address = tuple[str, int]
KEEP = 1000


def address_text(address: Address | None) -> str | None:
    if address is None:
        return None
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class ConnectionRecord:
    """One connection; field names and types are the /connections schema."""

    id: int
    proxy: ProxyKind
    listener: int
    direction: Direction
    peer: str | None
    original_dst: str | None
    src_identity: str | None
    dst_identity: str | None
    connect_target: str | None
    upstream: str | None
    path: Path
    verdict: Verdict
    reason: str | None
    bytes_sent: int
    bytes_received: int
    opened: float
    closed: float | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class ConnectionLog:
    """The last `keep` records of one proxy process (oldest dropped first)."""

    def __init__(
        self, proxy: ProxyKind, keep: int = KEEP, clock: Callable[[], float] = time.time
    ) -> None:
        self.proxy: ProxyKind = proxy
        self._records: deque[ConnectionRecord] = deque(maxlen=keep)
        self._ids = itertools.count(1)
        self._clock = clock

    def open(
        self,
        *,
        listener: int,
        direction: Direction,
        peer: Address | None,
        original_dst: Address | None,
        path: Path,
        src_identity: str | None = None,
        dst_identity: str | None = None,
        connect_target: str | None = None,
        upstream: Address | None = None,
    ) -> ConnectionRecord:
        record = ConnectionRecord(
            id=next(self._ids),
            proxy=self.proxy,
            listener=listener,
            direction=direction,
            peer=address_text(peer),
            original_dst=address_text(original_dst),
            src_identity=src_identity,
            dst_identity=dst_identity,
            connect_target=connect_target,
            upstream=address_text(upstream),
            path=path,
            verdict="allow",
            reason=None,
            bytes_sent=0,
            bytes_received=0,
            opened=self._clock(),
            closed=None,
        )
        self._records.append(record)
        return record

    def close(
        self,
        record: ConnectionRecord,
        *,
        sent: int = 0,
        received: int = 0,
        verdict: Verdict | None = None,
        reason: str | None = None,
    ) -> None:
        """Finish `record`: bytes sent to / received from the peer, and how it ended (a
        verdict given here replaces "allow"; a reason given earlier is kept if none is)."""
        if record.closed is not None:
            return
        record.bytes_sent, record.bytes_received = sent, received
        if verdict is not None:
            record.verdict = verdict
        if reason is not None:
            record.reason = reason
        record.closed = self._clock()

    def refuse(self, record: ConnectionRecord, reason: str, verdict: Verdict = "deny") -> None:
        self.close(record, verdict=verdict, reason=reason)

    def since(self, after: int = 0) -> list[ConnectionRecord]:
        return [r for r in self._records if r.id > after]

    def render(self, query: Mapping[str, str]) -> bytes:
        """The /connections body; `since` (an id) must be an integer."""
        try:
            after = int(query.get("since", "0"))
        except ValueError as exc:
            raise ValueError(f"since={query.get('since')!r} is not an integer id") from exc
        body = {"connections": [r.as_json() for r in self.since(after)]}
        return json.dumps(body).encode()
