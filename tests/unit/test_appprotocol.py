"""A service port's declared appProtocol: the model refuses what Istio does not know, the
control plane carries it into the L7 files, proxies look it up per target (service port, or
a workload port through the service that targets it) and read declared HTTP without
sniffing, declared TCP as L4; the kube export emits it."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import yaml

from testbed.cluster.model import Topology, TopologyError, plan
from testbed.cluster.waypoints import USE_WAYPOINT
from testbed.kube.export import service as kube_service
from testbed.mesh.appprotocol import APP_PROTOCOLS, handling, normalize
from testbed.mesh.config import ConfigError
from testbed.mesh.waypoint.app import _sniff
from testbed.mesh.waypoint.config import WaypointConfig
from testbed.mesh.waypoint.proxy import Target, declared_protocol, resolve_target
from testbed.mesh.waypoint.serve import peek_protocol
from testbed.redirect.control import mesh_config
from testbed.redirect.waypoint_config import app_protocols_of, l7_config_for

RATINGS = "default/ratings.default.svc.cluster.local"
RAW = "default/raw.default.svc.cluster.local"


class Declared(Topology):
    name = "declared"

    def build(self) -> None:
        self.add_node("n1")
        self.label_namespace("default", {USE_WAYPOINT: "wp"})
        self.add_waypoint("wp", "n1")
        self.add_pod("ratings", "n1", labels={"app": "ratings"})
        self.add_pod("raw", "n1", labels={"app": "raw"})
        self.add_pod("plain", "n1", labels={"app": "plain"})
        self.add_service("ratings", selector={"app": "ratings"}, ports={9080: 8080, 9090: 8081},
                         app_protocols={9080: "HTTP"})  # fmt: skip
        self.add_service("raw", selector={"app": "raw"}, ports={9080: 8080},
                         app_protocols={9080: "tcp"})  # fmt: skip
        self.add_service("plain", selector={"app": "plain"}, ports={9080: 8080})


def test_istio_protocols_split_into_http_and_opaque_tcp() -> None:
    assert [handling(p) for p in ("http", "http2", "grpc", "grpc-web")] == ["http"] * 4
    opaque = ("https", "tls", "tcp", "mongo", "mysql", "redis")
    assert [handling(p) for p in opaque] == ["tcp"] * 6
    assert handling(None) == "sniff"
    assert set(APP_PROTOCOLS) == {"http", "http2", "grpc", "grpc-web", *opaque}
    assert (normalize("GRPC-Web"), normalize("kubernetes.io/ws"), normalize(3)) == (
        "grpc-web", None, None,
    )  # fmt: skip


def test_the_model_keeps_declarations_lowercase() -> None:
    topology = plan(Declared())
    assert topology.services["ratings"].app_protocols == {9080: "http"}
    assert topology.services["plain"].app_protocols == {}
    assert app_protocols_of(topology) == {RATINGS: {9080: "http"}, RAW: {9080: "tcp"}}


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ({80: "thrift"}, "service 'web': app_protocols[80]: 'thrift' is not one of http, http2"),
        ({81: "http"}, "service 'web': app_protocols[81]: not a port of the service (ports: [80"),
        ({80: None}, "service 'web': app_protocols[80]: None is not one of http, http2"),
        (["http"], "service 'web': app_protocols ['http'] is not a mapping"),
    ],
)
def test_a_bad_declaration_is_one_error_naming_the_field(declared: Any, message: str) -> None:
    topology = Topology()
    with pytest.raises(TopologyError) as caught:
        topology.add_service("web", selector={"app": "web"}, ports=[80], app_protocols=declared)
    assert str(caught.value).startswith(f"topology custom: {message}")
    assert "web" not in topology.services  # nothing half-declared


def test_each_waypoint_gets_the_declarations_of_the_services_it_serves() -> None:
    topology = plan(Declared())
    config = mesh_config(topology)
    spec = topology.l7.waypoints["default/wp"]
    l7 = l7_config_for(spec, config, topology.l7, app_protocols_of(topology))
    assert l7.app_protocols == {RATINGS: {9080: "http"}, RAW: {9080: "tcp"}}
    assert l7_config_for(spec, config, topology.l7).app_protocols == {}
    again = WaypointConfig.model_validate(yaml.safe_load(l7.dump_yaml()))
    assert again == l7


def test_a_bad_l7_file_declaration_names_the_field(tmp_path: Any) -> None:
    path = tmp_path / "l7.yaml"
    path.write_text(f"appProtocols:\n  {RATINGS}: {{9080: thrift}}\n")
    with pytest.raises(ConfigError, match=r"appProtocols\..*9080"):
        WaypointConfig.load(path)


def test_proxies_look_the_declaration_up_by_service_port_or_workload_port() -> None:
    topology = plan(Declared())
    config = mesh_config(topology)
    l7 = WaypointConfig(app_protocols=app_protocols_of(topology))
    vip = topology.services["ratings"].vip
    by_vip = [resolve_target(config, (vip, port)) for port in (9080, 9090)]
    assert [declared_protocol(l7, config, t) for t in by_vip if t] == ["http", None]
    raw_vip = topology.services["raw"].vip
    raw = resolve_target(config, (raw_vip, 9080))
    assert raw is not None and declared_protocol(l7, config, raw) == "tcp"
    # a sidecar's inbound, or a workload-addressed waypoint: the pod's target port
    ratings = config.workload_by_ip(topology.pods["ratings"].ip)
    assert ratings is not None
    ip = str(ratings.workload_ips[0])
    ports = [declared_protocol(l7, config, Target((ip, p), None, ratings)) for p in (8080, 8081)]
    assert ports == ["http", None]
    plain = resolve_target(config, (topology.services["plain"].vip, 9080))
    assert plain is not None and declared_protocol(l7, config, plain) is None


def test_the_kube_export_emits_the_declaration() -> None:
    topology = plan(Declared())
    ports = {p.port: p for p in kube_service(topology.services["raw"]).spec.ports}
    assert (ports[9080].app_protocol, ports[9080].name) == ("tcp", "tcp-9080")
    ports = {p.port: p for p in kube_service(topology.services["ratings"]).spec.ports}
    assert (ports[9080].app_protocol, ports[9090].app_protocol) == ("http", None)


# ---------------------------------------------------------------- reading the first bytes


def _exchange(first: bytes, delay: float, **kwargs: Any) -> Any:
    """peek_protocol and the waypoint's _sniff on a socket whose client sends `first` after
    `delay` s; both results."""

    async def run(reader: Any) -> Any:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        loop.call_later(delay, theirs.sendall, first)
        try:
            return await reader(ours)
        finally:
            ours.close()
            theirs.close()

    peeked = asyncio.run(run(lambda s: peek_protocol(s, 0.05, http=kwargs["http"])))
    sniffed = asyncio.run(run(lambda s: _sniff(s, http=kwargs["http"])))
    return peeked, sniffed[0]


def test_declared_http_waits_for_a_slow_client_and_never_becomes_tcp() -> None:
    assert _exchange(b"GET / HTTP/1.1\r\n", 0.15, http=False)[0] == "tcp"  # sniffed: timeout
    assert _exchange(b"GET / HTTP/1.1\r\n", 0.15, http=True) == ("http/1.1", "http/1.1")
    assert _exchange(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0.0, http=True) == ("h2", "h2")
    # bytes that are no HTTP: the HTTP/1.1 parser gets them (and answers 400)
    assert _exchange(b"\x16\x03\x01\x02\x00", 0.0, http=True) == ("http/1.1", "http/1.1")
    assert _exchange(b"\x16\x03\x01\x02\x00", 0.0, http=False) == ("tcp", "tcp")
