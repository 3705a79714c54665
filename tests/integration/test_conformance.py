"""One conformance suite for every redirection mode (docs/architecture.md).

Each mode (each variant of it) gets one cluster for the whole module: on node1 a client and
server1, on node2 server2 and an `outsider` that stays out of the mesh
(istio.io/dataplane-mode: none). Every pod runs a server that greets with "<pod> <peer ip>"
and answers the sha256 of what it received.

Every mode with L7 (in waypoints, as Istio's ambient modes; in the pods' own proxies, as
sidecars) also gets a cluster of topologies/reviews_waypoint.py, with its declared HTTP echo
apps: the waypoint (or the sidecars) splits, matches paths, denies at L7 and retries the
503s of the flaky `ratings` backend by default.

The modes come from the registry (testbed.redirect.registry): a new mode is tested here
without any change to this file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import podapps
import pytest
from podapps import (
    APP_PORT,
    GreetingServer,
    HttpReply,
    finish,
    http_requests,
    read_line,
)

from testbed.cluster import Cluster, Pod, Topology, load_topology
from testbed.redirect import MODES, create_mode

BLOCK = os.urandom(1 << 20)
TRANSFER_MB = 4
PLACEMENTS = {"same-node": "server1", "cross-node": "server2"}
REVIEWS_PORT = 9080  # the reviews services' port (target 8080, the echo server's)
SPLIT_REQUESTS = 1000
RETRIED_REQUESTS = 60  # to ratings, whose app answers 503 to every third request
SILENT_CLIENT = 1.5  # s a client waits before its request: past every proxy's sniffing

Case = tuple[str, dict[str, Any]]  # (mode, options)
ISTIO_ZTUNNEL = os.environ.get("TESTBED_ZTUNNEL", "")


def mode_cases() -> dict[str, Case]:
    """Test id -> case: every registered mode, once per variant (inpod-redirect, ...)."""
    cases: dict[str, Case] = {
        key: (name, options)
        for name, cls in MODES.items()
        for key, options in cls.variants().items()
    }
    if ISTIO_ZTUNNEL:  # Istio's own ztunnel on every node (testbed.redirect.istio_ztunnel)
        cases["inpod-istio-ztunnel"] = ("inpod", {"ztunnel": ISTIO_ZTUNNEL})
    return cases


def l7_cases() -> dict[str, Case]:
    """Test id -> case: every registered mode with L7 (waypoints, or L7 sidecars), with its
    defaults."""
    return {
        name: (name, {}) for name, cls in MODES.items() if cls.runs_waypoints or cls.l7_in_sidecars
    }


class ConformanceTopology(Topology):
    name = "conformance"

    def build(self) -> None:
        self.add_node("node1")
        self.add_node("node2")
        self.add_pod("client", "node1", labels={"app": "client", "role": "client"})
        self.add_pod("server1", "node1", service_account="server", labels={"app": "server"})
        self.add_pod("server2", "node2", service_account="server", labels={"app": "server"})
        self.add_pod("outsider", "node2", labels={"istio.io/dataplane-mode": "none"})
        self.add_service("greeter", selector={"app": "server"}, ports={APP_PORT: APP_PORT})


@dataclass
class Mesh:
    key: str
    cluster: Cluster

    @property
    def meshed(self) -> bool:
        return self.cluster.mode.name != "none"

    def pod(self, name: str) -> Pod:
        return self.cluster.pods[name]


@pytest.fixture(scope="module", params=list(mode_cases()))
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    mode, options = mode_cases()[request.param]
    cluster = Cluster(ConformanceTopology(), create_mode(mode, options))
    servers: list[GreetingServer] = []
    try:
        cluster.start()
        servers = [GreetingServer(pod) for pod in cluster.pods.values()]
        yield Mesh(request.param, cluster)
    finally:
        for server in servers:
            server.close()
        cluster.stop()


@pytest.fixture(scope="module", params=list(l7_cases()))
def reviews(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """topologies/reviews_waypoint.py: reviews split 90/10 over v1 and v2 by a waypoint (in
    sidecar mode: by the client's sidecar), `/v2...` pinned to v2, `/admin*` denied at L7,
    ratings failing every third request; the pods' declared HTTP echo apps answer (the
    topology starts them)."""
    mode, options = l7_cases()[request.param]
    cluster = Cluster(reviews_variant(), create_mode(mode, options))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def reviews_variant() -> Topology:
    """reviews_waypoint plus `raw`: an HTTP echo app behind a service whose port declares
    appProtocol tcp (L4 even though the bytes are HTTP)."""
    topology = load_topology("reviews_waypoint")
    base_build = topology.build

    def build() -> None:
        base_build()
        topology.add_pod("raw", "node2", labels={"app": "raw"}, app="http-echo", port=APP_PORT)
        ports, declared = {REVIEWS_PORT: APP_PORT}, {REVIEWS_PORT: "tcp"}
        topology.add_service("raw", selector={"app": "raw"}, ports=ports, app_protocols=declared)

    topology.build = build  # type: ignore[method-assign]
    return topology


# ---------------------------------------------------------------- helpers


# This suite gives a connection 10 s, and gives up on a refused or denied greeting after 3 s.
connect = functools.partial(podapps.connect, timeout=10.0)
greeting = functools.partial(podapps.greeting, timeout=3.0)


@contextlib.contextmanager
def policy(mesh: Mesh, name: str, **spec: Any) -> Iterator[None]:
    topology, mode = mesh.cluster.topology, mesh.cluster.mode
    topology.add_policy(name, **spec)
    try:
        mode.update_policies(topology)
        yield
    finally:
        topology.remove_policy(name)
        mode.update_policies(topology)


def resolve(pod: Pod, name: str) -> tuple[int, str]:
    """`getent hosts NAME` in the pod (its own resolv.conf): exit status and address."""
    done = pod.run(["getent", "hosts", name], check=False, timeout=15)
    return done.returncode, (done.stdout.split() or [""])[0]


# ---------------------------------------------------------------- the suite


def test_dns_answers_services_and_nxdomain_otherwise(mesh: Mesh) -> None:
    client = mesh.pod("client")
    vip = mesh.cluster.services["greeter"].vip
    assert resolve(client, "greeter.default.svc.cluster.local") == (0, vip)
    assert resolve(client, "greeter") == (0, vip)  # through the search list
    assert resolve(client, "nosuch.default.svc.cluster.local")[0] == 2  # NXDOMAIN: not found
    assert resolve(client, "example.com")[0] == 2  # nothing leaves the testbed


def test_connection_by_short_service_name(mesh: Mesh) -> None:
    script = (
        "import socket\n"
        f"with socket.create_connection(('greeter', {APP_PORT}), timeout=10) as s:\n"
        "    print(s.makefile().readline().split()[0])\n"
    )
    done = mesh.pod("client").run([sys.executable, "-c", script], timeout=30)
    assert done.stdout.strip() in {"server1", "server2"}


def test_captured_dns_is_answered_by_the_proxy(mesh: Mesh) -> None:
    """Only the proxy's DNS (ztunnel's, in-pod or sidecar) expands an absolute short name
    through the pod's search list; the cluster DNS service answers fully qualified names."""
    captured = mesh.cluster.mode.captures_dns
    status, address = resolve(mesh.pod("client"), "greeter.")
    assert (status == 0) == captured
    if captured:
        assert address == mesh.cluster.services["greeter"].vip
    # a pod out of the mesh is not captured: the cluster DNS answers it
    assert resolve(mesh.pod("outsider"), "greeter.")[0] == 2


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_app_sees_the_client_address(mesh: Mesh, placement: str) -> None:
    client, server = mesh.pod("client"), mesh.pod(PLACEMENTS[placement])
    assert greeting(client, server.ip) == f"{server.name} {client.ip}"


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_bytes_arrive_intact(mesh: Mesh, placement: str) -> None:
    client, server = mesh.pod("client"), mesh.pod(PLACEMENTS[placement])
    sent = hashlib.sha256()
    with connect(client, server.ip, timeout=60) as sock:
        assert read_line(sock) == f"{server.name} {client.ip}"
        for _ in range(TRANSFER_MB):
            sock.sendall(BLOCK)
            sent.update(BLOCK)
        assert finish(sock) == sent.hexdigest()


def test_wire_between_nodes_carries_mtls_only(mesh: Mesh) -> None:
    """No mesh: the marker is visible on node1's eth0; any mesh: only HBONE (15008)."""
    capture = mesh.cluster.nodes["node1"].netns.spawn(
        ["tcpdump", "-i", "eth0", "-n", "-A", "-U", "-l", "tcp"], label="tcpdump-conformance"
    )
    marker = b"PLAINTEXT-MARKER-" * 64
    try:
        time.sleep(0.8)  # tcpdump needs a moment before it captures
        with connect(mesh.pod("client"), mesh.pod("server2").ip) as sock:
            read_line(sock)
            sock.sendall(marker)
            assert finish(sock) == hashlib.sha256(marker).hexdigest()
        time.sleep(0.5)
    finally:
        capture.terminate()
    dump = capture.output()
    if mesh.meshed:
        assert ".15008" in dump
        assert "PLAINTEXT-MARKER" not in dump
    else:
        assert "PLAINTEXT-MARKER" in dump


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_l4_deny_policy_is_enforced(mesh: Mesh, placement: str) -> None:
    client, server = mesh.pod("client"), mesh.pod(PLACEMENTS[placement])
    deny = [{"principals": ["cluster.local/ns/default/sa/client"]}]
    with policy(mesh, "deny-client", action="DENY", selector={"app": "server"}, rules=deny):
        blocked = greeting(client, server.ip) is None
        assert blocked == mesh.meshed  # without a mesh nothing enforces the policy
    assert greeting(client, server.ip) == f"{server.name} {client.ip}"


def test_uncaptured_and_captured_pods_reach_each_other(mesh: Mesh) -> None:
    outsider, client, server1 = mesh.pod("outsider"), mesh.pod("client"), mesh.pod("server1")
    assert greeting(outsider, server1.ip) == f"server1 {outsider.ip}"
    assert greeting(client, outsider.ip) == f"outsider {client.ip}"


def test_enrolment_changes_leave_other_connections_alone(
    mesh: Mesh, request: pytest.FixtureRequest
) -> None:
    if mesh.key == "inpod-istio-ztunnel":
        reason = "Istio's ztunnel reads its local config at start: a push restarts it and cuts"
        request.applymarker(pytest.mark.xfail(strict=True, raises=OSError, reason=reason))
    client, server1, server2 = mesh.pod("client"), mesh.pod("server1"), mesh.pod("server2")
    mode = mesh.cluster.mode
    sent = hashlib.sha256()
    with connect(client, server2.ip, timeout=30) as running:
        assert read_line(running) == f"server2 {client.ip}"
        for _ in range(2):
            mode.unenroll(server1)
            running.sendall(BLOCK)
            sent.update(BLOCK)
            assert greeting(client, server1.ip) == f"server1 {client.ip}"
            mode.enroll(server1)
            running.sendall(BLOCK)
            sent.update(BLOCK)
            assert greeting(client, server1.ip) == f"server1 {client.ip}"
        assert finish(running) == sent.hexdigest()


def test_facts_name_the_mode_and_its_fallbacks(mesh: Mesh) -> None:
    facts = mesh.cluster.inventory()["facts"]
    assert facts["mode"] == mesh.cluster.mode.name
    if facts["mode"] == "legacy":
        from testbed.redirect.legacy import probe_geneve

        geneve, _ = probe_geneve(mesh.cluster.nodes["node1"].netns)
        assert facts["tunnel"] == ("geneve" if geneve else "vxlan")
    if mesh.meshed:
        assert mesh.cluster.proxy_pids()


# ---------------------------------------------------------------- L7 through waypoints


def reviews_requests(
    cluster: Cluster, path: str, count: int, service: str = "reviews"
) -> list[HttpReply]:
    """`count` GETs from productpage to `service`:9080, on one keep-alive connection."""
    vip = cluster.services[service].vip
    return http_requests(cluster.pod("productpage"), vip, REVIEWS_PORT, path, count)


def app_stats(pod: Pod) -> dict[str, int]:
    """The HTTP echo app's own counters, asked inside its pod (not through the mesh)."""
    [reply] = http_requests(pod, "127.0.0.1", APP_PORT, "/stats", 1)
    assert reply.status == 200
    stats: dict[str, int] = json.loads(reply.body)
    return stats


def test_waypoint_splits_requests_by_weight(reviews: Cluster) -> None:
    replies = reviews_requests(reviews, "/reviews", SPLIT_REQUESTS)
    assert {r.status for r in replies} == {200}
    served = Counter(r.served_by for r in replies)
    assert set(served) == {"reviews-v1", "reviews-v2"}, served
    assert 62 <= served["reviews-v2"] <= 138, served  # 10 % of 1000 +- 4 sd; 50/50 is 500


def test_waypoint_path_match_picks_v2(reviews: Cluster) -> None:
    replies = reviews_requests(reviews, "/v2/reviews", 20)
    assert [(r.status, r.served_by) for r in replies] == [(200, "reviews-v2")] * 20


def test_waypoint_l7_deny_is_403(reviews: Cluster) -> None:
    replies = reviews_requests(reviews, "/admin/users", 3)
    assert [(r.status, r.body) for r in replies] == [(403, b"RBAC: access denied")] * 3
    assert {r.status for r in reviews_requests(reviews, "/v2/ok", 3)} == {200}


def test_default_retries_hide_a_backend_that_answers_503(reviews: Cluster) -> None:
    """Istio's default retry policy (2 retries, 503 among the conditions) in the waypoint
    (in sidecar mode, the client's sidecar): every request succeeds, while the ratings app's
    own counter shows it answered 503s (every third request it got)."""
    ratings = reviews.pod("ratings")
    before = app_stats(ratings)
    replies = reviews_requests(reviews, "/ratings", RETRIED_REQUESTS, service="ratings")
    assert [(r.status, r.served_by) for r in replies] == [(200, "ratings")] * RETRIED_REQUESTS
    after = app_stats(ratings)
    injected = after["injected_503"] - before["injected_503"]
    answered = after["requests"] - before["requests"]
    assert answered == RETRIED_REQUESTS + injected  # each 503 was tried again
    assert injected >= RETRIED_REQUESTS // 3, (before, after)


def test_the_app_sees_the_l7_proxy_as_its_peer(reviews: Cluster) -> None:
    """Behind a waypoint the app sees the waypoint's address (its upstream HBONE forwards no
    client address, as with Istio). Sidecar mode has no waypoint: the client's sidecar,
    in the client's pod, is the peer, so the app sees the client pod's address."""
    [reply] = reviews_requests(reviews, "/v2/peer?format=json", 1)
    assert reply.status == 200
    peer = json.loads(reply.body)["peer"].rpartition(":")[0]
    expected = "productpage" if MODES[reviews.mode.name].l7_in_sidecars else "waypoint"
    assert peer == reviews.pod(expected).ip


def echoed_request_headers(cluster: Cluster, service: str, wait: float = 0.0) -> dict[str, str]:
    """The request headers the echo app behind `service` received for one GET from
    productpage, sent `wait` s after the connection opened."""
    vip = cluster.services[service].vip
    conn = http.client.HTTPConnection(vip, REVIEWS_PORT, timeout=10)
    conn.sock = connect(cluster.pod("productpage"), vip, REVIEWS_PORT)
    try:
        time.sleep(wait)
        conn.request("GET", "/headers?format=json")
        response = conn.getresponse()
        assert response.status == 200
        headers: dict[str, str] = json.loads(response.read())["headers"]
        return headers
    finally:
        conn.close()


def test_declared_tcp_port_is_l4_even_for_http(reviews: Cluster) -> None:
    """appProtocol tcp: no L7 proxy parses the request, so none adds Envoy's headers."""
    assert "x-request-id" in echoed_request_headers(reviews, "ratings")  # declared http: L7
    assert "x-request-id" not in echoed_request_headers(reviews, "raw")


def test_declared_http_port_is_l7_without_sniffing(reviews: Cluster) -> None:
    """A client silent past the sniffing timeout (waypoint 1 s, sidecar 100 ms) makes an
    undeclared port plain TCP; a port declared appProtocol http stays HTTP. (reviews-v2:
    undeclared, and no L7 policy of its own, whose DENY rule on paths would refuse TCP.)"""
    assert "x-request-id" in echoed_request_headers(reviews, "ratings", wait=SILENT_CLIENT)
    undeclared = echoed_request_headers(reviews, "reviews-v2", wait=SILENT_CLIENT)
    assert "x-request-id" not in undeclared
