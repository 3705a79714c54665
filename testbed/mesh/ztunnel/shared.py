"""ztunnel in the "shared netns" shape of Istio's legacy ambient mode (docs/architecture.md).

One process in the ztunnel pod's own namespace serves every mesh workload of its node. The
node's rules and the TPROXY rules in this namespace deliver captured connections to three
IP_TRANSPARENT listeners: 15001 (outbound, from a local pod), 15006 (plaintext inbound) and
15008 (HBONE inbound), and its DNS proxy on 15053 (UDP and TCP, where the ebpf mode's rules
send the pods' captured DNS). The original destination is the accepted socket's local
address; the local workload is found by address: the client's for outbound, the
destination's for inbound, whose certificate the HBONE server then presents.

Per workload the in-pod handlers (testbed.mesh.ztunnel.outbound/inbound) run unchanged on a
`PodProxy` whose "pod namespace" is ztunnel's own: connections to apps leave from the
client's address (IP_TRANSPARENT) and come back through the node's 0x210/0x040 marks and the
0x4d3 rule here. HBONE connections leave from ztunnel's own address, bound explicitly, so that
one to a workload of this same node (routed to the local table by the ztunnel-netns rule
for port 15008) is answered over loopback.

With the same-node fast path on (Istio 1.20's behaviour), a connection to a workload of
this node is handed to its inbound side in-process (testbed.mesh.ztunnel.local); off, it
goes over HBONE to this ztunnel's own 15008 like any other.

    python -m testbed.mesh.ztunnel.shared --config FILE --certs DIR --node N --ztunnel-ip IP \
        --same-node-fast-path on|off
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from collections.abc import Callable
from contextvars import ContextVar

from testbed.mesh import dns
from testbed.mesh.config import LocalConfig
from testbed.mesh.hbone import HboneClient, HboneServer, reset_socket
from testbed.mesh.hbone.server import ServerConnection
from testbed.mesh.podsockets import IP_TRANSPARENT
from testbed.mesh.ztunnel import (
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT,
)
from testbed.mesh.ztunnel.inbound import HboneInbound, serve_inbound_plaintext
from testbed.mesh.ztunnel.netio import Address
from testbed.mesh.ztunnel.outbound import serve_outbound
from testbed.mesh.ztunnel.pods import PodProxy, accept_forever
from testbed.mesh.ztunnel.process import ZtunnelProcess, main
from testbed.mesh.ztunnel.state import MeshState

log = logging.getLogger(__name__)


# The client of the outbound connection being handled (set per connection task): plain
# pass-through connections leave from its address, as legacy ztunnel's original source did.
_client_ip: ContextVar[str | None] = ContextVar("client_ip", default=None)


class SharedPod(PodProxy):
    """A workload served from ztunnel's own namespace."""

    def __init__(
        self,
        mesh: MeshState,
        uid: str,
        home_fd: int,
        ztunnel_ip: str,
        local_pod: Callable[[str], PodProxy | None] | None,
    ) -> None:
        super().__init__(mesh, uid, os.dup(home_fd))
        self.ztunnel_ip = ztunnel_ip
        self.local_pod = local_pod
        self.hbone_client = HboneClient(socket_factory=self._hbone_socket)
        self.hbone_server = HboneServer(
            mesh.certs.server_context(self.workload.identity), HboneInbound(self)
        )

    def _hbone_socket(self, family: int) -> socket.socket:
        """From ztunnel's own address, so that replies from a same-node HBONE listener
        come back over loopback."""
        sock = super().upstream_socket(family)
        sock.bind((self.ztunnel_ip, 0))
        return sock

    def upstream_socket(self, family: int) -> socket.socket:
        """Pass-through to a workload outside the mesh, from the client's own address."""
        client_ip = _client_ip.get()
        if client_ip is None:
            return self._hbone_socket(family)
        sock = self.transparent_socket(family)
        sock.bind((client_ip, 0))
        return sock


def transparent_listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class SharedZtunnel(ZtunnelProcess):
    shape = "shared"

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args.config, args.certs, args.node)
        self.ztunnel_ip: str = args.ztunnel_ip
        self.fast_path = args.same_node_fast_path == "on"
        self.home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._listeners: list[socket.socket] = []
        self._dns_sockets: tuple[socket.socket, socket.socket] | None = None

    def dns_zone(self, client_ip: str) -> dns.Zone:
        """What the DNS proxy answers a client: the services, through the search list of the
        client's namespace (fully qualified names only for a client the mesh does not know)."""
        workload = self.mesh.config.workload_by_ip(client_ip)
        if workload is None:
            return dns.Zone(dns.proxy_zone(self.mesh.config, "").records)
        return dns.proxy_zone(self.mesh.config, workload.namespace)

    def pod_for(self, ip: str) -> PodProxy | None:
        """The local mesh workload with this address (None for any other address)."""
        workload = self.mesh.config.workload_by_ip(ip)
        if workload is None or workload.node != self.node:
            return None
        if workload.protocol != "HBONE":
            return None
        pod = self.pods.get(workload.uid)
        if pod is None:
            local_pod = self.pod_for if self.fast_path else None
            pod = SharedPod(self.mesh, workload.uid, self.home_fd, self.ztunnel_ip, local_pod)
            self.pods[workload.uid] = pod
        return pod

    def on_config(self, config: LocalConfig) -> None:
        super().on_config(config)
        for uid in list(self.pods):
            workload = config.workload_by_uid(uid)
            if workload is None or workload.protocol != "HBONE":
                self.spawn(self.pods.pop(uid).stop())

    async def start(self) -> None:
        self._listeners = [
            transparent_listener(port)
            for port in (OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT)
        ]
        self._dns_sockets = dns.bind_sockets("0.0.0.0", dns.PROXY_PORT)
        self.ready = True
        log.info("ztunnel (shared) for %s serving", self.node)

    async def serve(self) -> None:
        assert self._dns_sockets is not None
        await asyncio.gather(
            dns.serve(self.dns_zone, *self._dns_sockets),
            *(self._accept_loop(sock) for sock in self._listeners),
        )

    async def stop(self) -> None:
        for sock in (*self._listeners, *(self._dns_sockets or ())):
            sock.close()
        await super().stop()

    async def _accept_loop(self, listener: socket.socket) -> None:
        port = int(listener.getsockname()[1])
        await accept_forever(
            listener, lambda conn, peer: self._dispatch(port, conn, peer), self.spawn, f"{port}"
        )

    async def _dispatch(self, port: int, conn: socket.socket, peer: Address) -> None:
        local_ip = str(conn.getsockname()[0])
        pod = self.pod_for(peer[0] if port == OUTBOUND_PORT else local_ip)
        if pod is None:
            log.info("port %d: %s -> %s is no workload of this node", port, peer, local_ip)
            reset_socket(conn)
            return
        try:
            if port == OUTBOUND_PORT:
                _client_ip.set(peer[0])
                await serve_outbound(pod, conn, peer)
            elif port == INBOUND_PLAINTEXT_PORT:
                await serve_inbound_plaintext(pod, conn, peer)
            else:
                await _serve_hbone(pod, conn)
        except Exception:
            log.exception("port %d: connection from %s failed", port, peer)
            conn.close()


async def _serve_hbone(pod: PodProxy, conn: socket.socket) -> None:
    """Hand an accepted connection to the destination workload's HBONE server (its cert)."""
    server = pod.hbone_server
    assert server is not None
    await asyncio.get_running_loop().connect_accepted_socket(
        lambda: ServerConnection(server.ssl_context, server), conn
    )


if __name__ == "__main__":
    main(
        "testbed.mesh.ztunnel.shared",
        SharedZtunnel,
        {
            "ztunnel-ip": "this ztunnel pod's address",
            "same-node-fast-path": "on: a workload of this node is served in-process (Istio"
            " 1.20), off: over HBONE to this ztunnel's own 15008",
        },
        __doc__,
    )
