"""The same-node fast path of Istio 1.20's shared ztunnel (RequestType::DirectLocal).

When the destination of an outbound connection is a mesh workload of the ztunnel's own node
(without a waypoint: testbed.mesh.ztunnel.route decides), the shared ztunnel hands the
accepted socket to its inbound side in the same process instead of opening HBONE to itself:
the destination's L4 policies apply with the source workload's identity and the client's
address, as for HBONE, then ztunnel connects to the app from the client's address and relays.
No TLS, no HBONE, no second connection through the kernel. The connection is registered like
an inbound one, so a later policy that denies it closes it.
"""

from __future__ import annotations

import socket

from testbed.mesh.authz import ConnectionFacts
from testbed.mesh.hbone import relay_tcp
from testbed.mesh.hbone.connect import format_address
from testbed.mesh.proxy.connections import ConnectionRecord
from testbed.mesh.ztunnel.enforce import OpenConnection
from testbed.mesh.ztunnel.inbound import _closer, _denied, _labels, connect_app
from testbed.mesh.ztunnel.netio import Address
from testbed.mesh.ztunnel.pods import PodProxy
from testbed.mesh.ztunnel.route import DirectLocal


def _facts(source: PodProxy, peer: Address, decision: DirectLocal) -> ConnectionFacts:
    return ConnectionFacts(source.workload.identity, peer[0], *decision.target)


def denied(
    source: PodProxy, destination: PodProxy, peer: Address, decision: DirectLocal,
    record: ConnectionRecord,
) -> bool:  # fmt: skip
    """The destination's policies refuse it (counted and recorded as an inbound denial)."""
    labels = _labels(destination, peer[0], source.workload.identity.uri, mtls=True)
    return _denied(destination, _facts(source, peer, decision), labels, record)


async def relay(
    source: PodProxy, destination: PodProxy, client: socket.socket, peer: Address,
    decision: DirectLocal, record: ConnectionRecord,
) -> None:  # fmt: skip
    """Connect to the app from the client's address and relay until either side closes."""
    upstream = await connect_app(destination, decision.target, peer[0])
    record.upstream = format_address(decision.target)
    open_connection = OpenConnection(
        destination.workload.key, _facts(source, peer, decision), _closer(client, upstream), record
    )
    token = destination.mesh.open_inbound.add(open_connection)
    try:
        await relay_tcp(client, upstream)
    finally:
        destination.mesh.open_inbound.discard(token)
