"""The L7 sidecar's parts: which services a workload serves on a port, which L7 policies
its inbound requests are judged by, and sniffing that leaves the bytes in the socket."""

from __future__ import annotations

import socket

from hbone_support import run
from waypoint_support import local_config, service_key

from testbed.mesh.waypoint.config import WaypointConfig
from testbed.mesh.waypoint.serve import peek_protocol
from testbed.mesh.ztunnel.sidecar_l7 import inbound_policies, services_of


def test_services_of_a_workload_by_target_port() -> None:
    config = local_config()
    r1 = config.workload_by_ip("10.244.2.2")
    assert r1 is not None
    keys = [s.key for s in services_of(config, r1, 9080)]
    assert keys == sorted(service_key(n) for n in ("reviews", "reviews-v1", "flaky"))
    assert services_of(config, r1, 1234) == []


def test_inbound_policies_are_those_of_the_workloads_services_or_namespace() -> None:
    config = local_config()
    r2 = config.workload_by_ip("10.244.2.3")  # reviews and reviews-v2, namespace default
    assert r2 is not None
    l7 = WaypointConfig.model_validate(
        {
            "policies": [
                {"name": "mine", "targets": [service_key("reviews-v2")], "action": "DENY"},
                {"name": "not-mine", "targets": [service_key("flaky")], "action": "DENY"},
                {"name": "namespace", "namespace": "default", "action": "DENY"},
                {"name": "elsewhere", "namespace": "other", "action": "DENY"},
            ]
        }
    )
    chosen = inbound_policies(l7, config, r2).policies
    assert [p.name for p in chosen] == ["mine", "namespace"]
    assert all(p.targets == [] for p in chosen)  # they apply whatever service was called


def test_peek_protocol_leaves_the_bytes_and_spots_server_first_apps() -> None:
    async def scenario() -> list[object]:
        seen: list[object] = []
        client, ours = socket.socketpair()
        app, app_peer = socket.socketpair()
        for sock in (ours, app):
            sock.setblocking(False)
        client.sendall(b"GET / HTTP/1.1\r\n")
        seen.append(await peek_protocol(ours, 1.0, server=app))
        seen.append(ours.recv(100))  # still there to be read
        app_peer.sendall(b"220 hello\r\n")  # the app speaks first
        seen.append(await peek_protocol(ours, 1.0, server=app))
        quiet, quiet_peer = socket.socketpair()
        quiet.setblocking(False)
        seen.append(await peek_protocol(quiet, 0.05))  # silence: plain TCP
        quiet_peer.close()
        seen.append(await peek_protocol(quiet, 1.0))  # closed without a byte
        for sock in (client, ours, app, app_peer, quiet):
            sock.close()
        return seen

    assert run(scenario()) == ["http/1.1", b"GET / HTTP/1.1\r\n", "tcp", "tcp", None]
