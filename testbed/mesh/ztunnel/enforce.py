"""Policy on open connections: Istio's ztunnel re-checks every open inbound connection when
the policies change and closes those the new policies deny. This keeps, per open inbound
connection, the facts its policy check saw and how to close it (socket-free)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from testbed.mesh.authz import CompiledPolicies, ConnectionFacts, Decision
from testbed.mesh.config import LocalConfig
from testbed.mesh.proxy.connections import ConnectionRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenConnection:
    workload_key: str  # the destination workload
    facts: ConnectionFacts
    close: Callable[[], None]  # ends the connection (both directions)
    record: ConnectionRecord | None = None


class OpenConnections:
    def __init__(self) -> None:
        self._open: dict[int, OpenConnection] = {}
        self._tokens = itertools.count()

    def add(self, connection: OpenConnection) -> int:
        token = next(self._tokens)
        self._open[token] = connection
        return token

    def discard(self, token: int) -> None:
        self._open.pop(token, None)

    def __len__(self) -> int:
        return len(self._open)

    def recheck(
        self, config: LocalConfig, policies: CompiledPolicies
    ) -> list[tuple[OpenConnection, Decision]]:
        """Close (and forget) the connections `policies` deny now; returns them with the
        deciding verdict. A connection whose workload left the config is left alone: it
        ends with its pod."""
        denied = []
        for token, connection in list(self._open.items()):
            workload = config.workload_by_uid(connection.workload_key)
            if workload is None:
                continue
            decision = policies.evaluate(workload, connection.facts)
            if decision.allowed:
                continue
            del self._open[token]
            if connection.record is not None:
                connection.record.verdict = "deny"
                connection.record.reason = f"closed on policy change: {decision.reason}"
            connection.close()
            denied.append((connection, decision))
        return denied
