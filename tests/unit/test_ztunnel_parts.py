"""ztunnel's socket-free parts: round-robin, identities, labels, tcp_info, the admin HTTP.
The outbound decision has its own tests (test_ztunnel_route.py)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from testbed.cluster import Topology, plan
from testbed.mesh.proxy.http import Response, respond
from testbed.mesh.ztunnel.certs import CertStore
from testbed.mesh.ztunnel.inbound import peer_identity
from testbed.mesh.ztunnel.netio import parse_tcp_info_bytes
from testbed.mesh.ztunnel.outbound import tracing_headers
from testbed.mesh.ztunnel.route import Hbone, decide_outbound
from testbed.mesh.ztunnel.state import MeshState, config_digest
from testbed.mesh.ztunnel.telemetry import traffic_labels
from testbed.redirect.control import mesh_config


class Pair(Topology):
    def build(self) -> None:
        self.add_node("n1")
        self.add_pod("client", "n1")
        self.add_pod("web1", "n1", service_account="web", labels={"app": "web", "version": "v1"})
        self.add_pod("web2", "n1", service_account="web", labels={"app": "web", "version": "v2"})
        self.add_pod("old", "n1", labels={"istio.io/dataplane-mode": "none"})
        self.add_service("web", selector={"app": "web"}, ports={80: 8080})


def state() -> tuple[MeshState, Topology]:
    topology = plan(Pair())
    return MeshState(mesh_config(topology), CertStore(Path("/nonexistent")), "n1"), topology


def test_vip_round_robins_over_endpoints_with_target_port() -> None:
    mesh, topology = state()
    vip = topology.services["web"].vip
    decisions = [decide_outbound(mesh.config, (vip, 80), mesh.pick) for _ in range(4)]
    assert all(isinstance(d, Hbone) and d.service is not None for d in decisions)
    targets = [d.target for d in decisions if isinstance(d, Hbone)]
    web1, web2 = topology.pods["web1"].ip, topology.pods["web2"].ip
    assert targets == [(web1, 8080), (web2, 8080), (web1, 8080), (web2, 8080)]


def test_config_update_replaces_policies_and_digest() -> None:
    mesh, topology = state()
    before = mesh.digest
    topology.add_policy("deny", action="DENY", rules=[{}])
    mesh.update(mesh_config(topology))
    assert mesh.digest != before and mesh.digest == config_digest(mesh_config(topology))
    web1 = mesh.config.workload_by_uid("default-web1")
    assert web1 is not None and mesh.policies.for_workload(web1).deny


def test_peer_identity_needs_spiffe_in_the_trust_domain() -> None:
    uri = "spiffe://cluster.local/ns/a/sa/b"
    identity = peer_identity(uri, "cluster.local")
    assert identity is not None and identity.service_account == "b"
    assert peer_identity(uri, "example.org") is None
    assert peer_identity("https://example.org", "cluster.local") is None
    assert peer_identity(None, "cluster.local") is None


def test_labels_name_both_ends_and_security() -> None:
    mesh, topology = state()
    client = mesh.config.workload_by_uid("default-client")
    assert client is not None
    route = decide_outbound(mesh.config, (topology.services["web"].vip, 80), mesh.pick)
    assert isinstance(route, Hbone)
    labels = traffic_labels("source", source=client, source_principal=client.identity.uri,
                            destination=route.workload, service=route.service,
                            mutual_tls=True)  # fmt: skip
    assert labels.source_principal == "spiffe://cluster.local/ns/default/sa/client"
    assert labels.destination_principal == "spiffe://cluster.local/ns/default/sa/web"
    assert labels.destination_service == "web.default.svc.cluster.local"
    assert (labels.destination_app, labels.destination_version) == ("web", "v1")
    assert labels.connection_security_policy == "mutual_tls"
    old = mesh.config.workload_by_uid("default-old")
    plain = traffic_labels("destination", source=None, source_principal=None,
                           destination=old, mutual_tls=False)  # fmt: skip
    assert (plain.source_principal, plain.destination_principal) == ("unknown", "unknown")


def test_tcp_info_byte_counters() -> None:
    raw = bytes(120) + struct.pack("=QQ", 1000, 2000) + bytes(100)
    assert parse_tcp_info_bytes(raw) == (1000, 2000)
    assert parse_tcp_info_bytes(bytes(104)) == (0, 0)


ROUTES = {"/ready": lambda query: Response(200, f"ok{dict(query)}\n".encode())}


def test_admin_http_routes() -> None:
    ok = respond(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n", ROUTES)
    assert ok.status == 200 and ok.encode().endswith(
        b"Content-Length: 5\r\nConnection: close\r\n\r\nok{}\n"
    )
    assert respond(b"GET /ready?x=1 HTTP/1.1\r\n\r\n", ROUTES).body == b"ok{'x': '1'}\n"
    assert respond(b"HEAD /ready HTTP/1.1\r\n\r\n", ROUTES).body == b""
    assert respond(b"GET /nope HTTP/1.1\r\n\r\n", ROUTES).status == 404
    assert respond(b"POST /ready HTTP/1.1\r\n\r\n", ROUTES).status == 405
    assert respond(b"\x16\x03\x01garbage\r\n\r\n", ROUTES).status == 400


def test_tracing_headers_name_the_caller_and_start_a_trace() -> None:
    mesh, _ = state()
    client = mesh.config.workload_by_uid("default-client")
    assert client is not None
    headers = tracing_headers(client)
    assert "k8s.namespace.name=default" in headers["baggage"]
    assert "k8s.pod.name=client" in headers["baggage"]
    assert re.fullmatch("00-[0-9a-f]{32}-[0-9a-f]{16}-00", headers["traceparent"])
    assert tracing_headers(client)["traceparent"] != headers["traceparent"]
