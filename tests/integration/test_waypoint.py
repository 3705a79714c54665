"""A waypoint in a real two-node inpod cluster: routing, splits, retries, faults, L7 policy,
who passes through it, and what fails when it stops.

Namespace `default` uses the waypoint `waypoint` (for services). reviews has a v1 pod on
node2 and a v2 pod on node1; flaky has reviews-v1 and a pod that always answers 503; ratings
opts out of the waypoint. Clients: `client` (default) and `intruder` (namespace other).
Namespace `guarded` binds its workloads (not services) to the waypoint `guard`: its pod
`vault` takes HBONE only from `guard`; `outsider` (out of the mesh) dials it directly.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hbone_probe import H2Connect

from testbed.cluster import Cluster, Pod, Topology
from testbed.cluster.waypoints import USE_WAYPOINT
from testbed.mesh.ca import Identity
from testbed.redirect import create_mode
from testbed.redirect.base import MeshMode, http_get

APP_PORT = 8080
SERVICE_PORT = 9080
REQUESTS = 1000

# Runs in a client pod: GET <path> <count> times on one keep-alive connection (a new one
# after an error); prints the status counts, x-served-by counts and the slowest latency.
CLIENT = r"""
import http.client, json, sys, time
host, port, path, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
statuses, served, slowest, conn = {}, {}, 0.0, None
for _ in range(count):
    started = time.perf_counter()
    try:
        conn = conn or http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        status, name = str(response.status), response.getheader("x-served-by", "-")
    except (OSError, http.client.HTTPException) as exc:
        status, name, conn = type(exc).__name__, "-", None
    slowest = max(slowest, time.perf_counter() - started)
    statuses[status] = statuses.get(status, 0) + 1
    served[name] = served.get(name, 0) + 1
print(json.dumps({"statuses": statuses, "served": served, "slowest": slowest}))
"""

# Runs in the broken pod: every request is answered 503.
ALWAYS_503 = r"""
import http.server, sys
class Broken(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(503)
        self.send_header("content-length", "0")
        self.send_header("x-served-by", "broken")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Broken).serve_forever()
"""

# Runs in the whoami pod: answers every request with the TCP peer address it saw.
WHOAMI = r"""
import http.server, sys
class Whoami(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = self.client_address[0].encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-served-by", body.decode())
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Whoami).serve_forever()
"""


class WaypointTopology(Topology):
    name = "waypoint_test"

    def build(self) -> None:
        self.add_node("node1")
        self.add_node("node2")
        self.label_namespace("default", {USE_WAYPOINT: "waypoint"})
        self.add_waypoint("waypoint", "node2")
        self.add_pod("client", "node1", labels={"app": "client"})
        self.add_pod("intruder", "node1", namespace="other", labels={"app": "intruder"})
        v1 = {"app": "reviews", "version": "v1", "flaky": "yes"}
        self.add_pod("reviews-v1", "node2", service_account="reviews", labels=v1)
        v2 = {"app": "reviews", "version": "v2"}
        self.add_pod("reviews-v2", "node1", service_account="reviews", labels=v2)
        self.add_pod("broken", "node2", labels={"flaky": "yes"})
        self.add_pod("ratings", "node2", labels={"app": "ratings"})
        self.add_pod("whoami", "node1", labels={"app": "whoami"})
        self.label_namespace("guarded", {USE_WAYPOINT: "guard"})
        self.add_waypoint("guard", "node1", namespace="guarded", waypoint_for="workload")
        self.add_pod("vault", "node2", namespace="guarded", labels={"app": "vault"})
        self.add_pod("outsider", "node1", labels={"istio.io/dataplane-mode": "none"})
        ports = {SERVICE_PORT: APP_PORT}
        self.add_service("reviews", selector={"app": "reviews"}, ports=ports)
        self.add_service("reviews-v1", selector=v1, ports=ports)
        self.add_service("reviews-v2", selector=v2, ports=ports)
        self.add_service("flaky", selector={"flaky": "yes"}, ports=ports)
        self.add_service("whoami", selector={"app": "whoami"}, ports=ports)
        self.add_service(
            "ratings", selector={"app": "ratings"}, ports=ports, labels={USE_WAYPOINT: "none"}
        )
        self.add_http_route(
            "reviews",
            services=["reviews"],
            rules=[
                {"backends": [{"service": "reviews-v1", "weight": 80},
                              {"service": "reviews-v2", "weight": 20}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                 "backends": [{"service": "reviews-v2"}]},
                {"matches": [{"path": {"type": "Exact", "value": "/slow"}}],
                 "fault": {"delay": {"fixedDelay": 2.0, "percentage": 100}},
                 "backends": [{"service": "reviews-v1"}]},
            ],
        )  # fmt: skip
        self.add_http_route(
            "flaky",
            services=["flaky"],
            rules=[
                {},  # Istio's default retry policy (2 retries, 503 among the conditions)
                {"matches": [{"path": {"value": "/no-retry"}}], "retry": {"attempts": 0}},
            ],
        )
        self.add_l7_policy(
            "no-admin",
            action="DENY",
            services=["reviews"],
            rules=[{"to": [{"paths": ["/admin*"]}]}],
        )
        self.add_l7_policy(
            "default-only",
            action="ALLOW",
            services=["reviews"],
            rules=[{"from": [{"namespaces": ["default"]}]}],
        )


def _await_listening(pod: Pod, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with pod.netns.entered():
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from testbed.netlab import clean_all

    root = Path("/run/testbed-tests") / f"waypoint-{tmp_path_factory.getbasetemp().name}"
    root.mkdir(parents=True, exist_ok=True)
    try:
        with Cluster(WaypointTopology(), create_mode("inpod"), root=root) as built:
            for name in ("reviews-v1", "reviews-v2", "ratings", "vault"):
                pod = built.pod(name)
                argv = [sys.executable, "-m", "testbed.workloads.http_echo", "--name", name]
                pod.spawn([*argv, "--port", str(APP_PORT)], label="echo")
            built.pod("broken").spawn(
                [sys.executable, "-c", ALWAYS_503, str(APP_PORT)], label="broken"
            )
            built.pod("whoami").spawn([sys.executable, "-c", WHOAMI, str(APP_PORT)], label="who")
            for name in ("reviews-v1", "reviews-v2", "ratings", "broken", "vault", "whoami"):
                _await_listening(built.pod(name), APP_PORT)
            yield built
    finally:
        clean_all(root)
        shutil.rmtree(root, ignore_errors=True)


def vip(cluster: Cluster, service: str) -> str:
    return cluster.services[service].vip


def requests(
    cluster: Cluster, service: str, path: str, count: int = 20, client: str = "client"
) -> dict[str, Any]:
    argv = [sys.executable, "-c", CLIENT, vip(cluster, service), str(SERVICE_PORT), path]
    result = cluster.pod(client).run([*argv, str(count)], timeout=300)
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def waypoint_metrics(cluster: Cluster) -> str:
    return http_get(cluster.pod("waypoint"), 15020, "/metrics")[1].decode()


def requests_counted(metrics: str, service: str) -> float:
    hostname = f'destination_service="{service}.default.svc.cluster.local"'
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("istio_requests_total{") and hostname in line
    )


def test_weighted_split_80_20_over_1000_requests(cluster: Cluster) -> None:
    report = requests(cluster, "reviews", "/reviews", REQUESTS)
    assert report["statuses"] == {"200": REQUESTS}
    assert 750 <= report["served"].get("reviews-v1", 0) <= 850, report  # 80 % +- 4 sd
    assert report["served"].get("reviews-v1", 0) + report["served"].get("reviews-v2", 0) == 1000


def test_path_route_selects_v2(cluster: Cluster) -> None:
    report = requests(cluster, "reviews", "/v2/reviews")
    assert report["served"] == {"reviews-v2": 20}


def test_default_retries_hide_503s(cluster: Cluster) -> None:
    hidden = requests(cluster, "flaky", "/", 40)
    assert hidden["statuses"] == {"200": 40}
    shown = requests(cluster, "flaky", "/no-retry", 40)
    assert shown["statuses"].get("503", 0) > 0  # the broken pod is really there


def test_the_app_behind_a_waypoint_sees_the_waypoint_as_its_peer(cluster: Cluster) -> None:
    """As with Istio: the waypoint's upstream HBONE forwards no client address."""
    report = requests(cluster, "whoami", "/", 3)
    assert report["served"] == {cluster.pod("waypoint").ip: 3}, report


def test_injected_delay_shows_as_latency(cluster: Cluster) -> None:
    report = requests(cluster, "reviews", "/slow", 1)
    assert report["statuses"] == {"200": 1}
    assert report["slowest"] >= 2.0


def test_l7_deny_and_policy_sees_the_original_client(cluster: Cluster) -> None:
    assert requests(cluster, "reviews", "/admin/users", 3)["statuses"] == {"403": 3}
    assert requests(cluster, "reviews", "/v2/ok", 3)["statuses"] == {"200": 3}
    # ALLOW namespace default: the waypoint judges the client's identity, not its own.
    assert requests(cluster, "reviews", "/v2/ok", 3, client="intruder")["statuses"] == {"403": 3}
    metrics = waypoint_metrics(cluster)
    assert 'source_principal="spiffe://cluster.local/ns/other/sa/intruder"' in metrics
    assert 'reporter="waypoint"' in metrics


def test_services_without_a_waypoint_bypass_it(cluster: Cluster) -> None:
    before = waypoint_metrics(cluster)
    report = requests(cluster, "ratings", "/", 10)
    assert report["served"] == {"ratings": 10}
    after = waypoint_metrics(cluster)
    assert requests_counted(after, "ratings") == requests_counted(before, "ratings") == 0
    assert requests_counted(after, "reviews") == requests_counted(before, "reviews")


def test_stopping_the_waypoint_fails_only_its_services(cluster: Cluster) -> None:
    mode = cluster.mode
    assert isinstance(mode, MeshMode)
    mode.stop_waypoint("waypoint")
    try:
        broken = requests(cluster, "reviews", "/v2/x", 3)
        assert "200" not in broken["statuses"]
        assert requests(cluster, "ratings", "/", 3)["statuses"] == {"200": 3}
    finally:
        mode.start_waypoint("waypoint")
    assert requests(cluster, "reviews", "/v2/x", 3)["statuses"] == {"200": 3}


def test_a_waypoint_bound_pod_takes_hbone_only_from_its_waypoint(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Istio's ztunnel refuses HBONE to a waypoint-bound workload unless it comes from that
    waypoint (its identity and address): skipping the waypoint skips its L7 policy."""
    vault, ratings = cluster.pod("vault"), cluster.pod("ratings")
    argv = [sys.executable, "-c", CLIENT, vault.ip, str(APP_PORT), "/", "5"]
    report = json.loads(cluster.pod("client").run(argv, timeout=60).stdout.strip().splitlines()[-1])
    assert report["statuses"] == {"200": 5} and report["served"] == {"vault": 5}
    mode = cluster.mode
    assert isinstance(mode, MeshMode) and mode.control is not None
    td = mode.trust_domain
    for name, identity in {
        "tester": Identity(td, "default", "tester"),
        "guard": Identity(td, "guarded", "guard"),  # the waypoint's name, not its address
    }.items():
        mode.control.ca.issue(identity).write(tmp_path / name)
        probe = H2Connect(cluster.pod("outsider"), vault.ip, tmp_path / name)
        try:
            assert probe.status(f"{vault.ip}:{APP_PORT}") == 401, name
        finally:
            probe.close()
    probe = H2Connect(cluster.pod("outsider"), ratings.ip, tmp_path / "tester")
    try:  # a pod bound to no waypoint takes it
        assert probe.status(f"{ratings.ip}:{APP_PORT}") == 200
    finally:
        probe.close()
