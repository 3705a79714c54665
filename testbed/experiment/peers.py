"""Peers measured beside the modes: `native`, HAProxy as an mTLS TCP tunnel.

A peer is not a redirection mode (nothing is captured, the client addresses the tunnel), so
it is not in the mode registry: its cases run on mode none's cluster, the client reaching
the tunnel's entry on its own node (testbed.bench.native has the tunnel and why it is a
fair reference: the same certificates and path as two ztunnels). One tunnel per placement,
between the client's and the server's node, forwarding every port the workloads serve on.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.experiment.paths import WORKLOAD_PORTS

NATIVE = "native"
# What a peer's rows say about it (a fact column, as a mode's facts are).
PEER_FACTS = {NATIVE: "haproxy mTLS tunnel node to node, one thread per side, TLS 1.3"}
PEER_TOOLS = {NATIVE: "haproxy"}  # the program a peer needs on PATH


@dataclass(frozen=True)
class PeerEndpoint:
    """Where the client connects, and the peer's processes (sampled as a mode's proxies)."""

    address: str
    pids: Mapping[str, int]


PeerFactory = Callable[[str, Any, Any, Any], AbstractContextManager[PeerEndpoint]]


@contextmanager
def real_peer_factory(peer: str, cluster: Any, client: Any, server: Any) -> Iterator[PeerEndpoint]:
    """Start `peer` for this client and server pod of a running mode-none Cluster."""
    if peer != NATIVE:
        raise ValueError(f"unknown peer {peer!r}")
    from testbed.bench.native import haproxy_tunnel

    nodes = cluster.nodes
    with (
        tempfile.TemporaryDirectory(prefix="native-peer-") as workdir,
        haproxy_tunnel(
            nodes[client.node], nodes[server.node], server.ip, WORKLOAD_PORTS, Path(workdir)
        ) as tunnel,
    ):
        server_pid, client_pid = tunnel.pids  # haproxy_tunnel starts the server side first
        yield PeerEndpoint(
            tunnel.address, {"haproxy-client": client_pid, "haproxy-server": server_pid}
        )
