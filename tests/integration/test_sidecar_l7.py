"""Sidecar mode as Istio's Envoy sidecars: HTTP is L7 in both sidecars (routes in the
client's, L7 policy and the app connection in the server's, istio_requests_total in both),
TCP stays L4.

`client` on node1; `echo-v1` (node2) and `echo-v2` (node1) run the HTTP echo app behind the
service `echo` (9080 -> 8080), split by a route: `/v2` goes to echo-v2, the rest to echo-v1;
a DENY policy answers /admin with 403. `greeter` runs a server-first TCP app; `flaky` is
echo-v2 and `broken`, which answers every request 503. Namespace
default uses a waypoint, as a topology written for ambient does: in sidecar mode no
waypoint runs, and the sidecars do its L7 work.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from podapps import GreetingServer, greeting

from testbed.cluster import Cluster, Pod, Topology
from testbed.cluster.waypoints import USE_WAYPOINT
from testbed.redirect.inpod import http_get

APP_PORT, SERVICE_PORT = 8080, 9080

# Runs in the client pod: GET each path once on a fresh connection; prints status,
# x-served-by and the echoed request headers of each.
GET = r"""
import http.client, json, sys
out = []
for path in sys.argv[3:]:
    conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    out.append({"status": r.status, "served": r.getheader("x-served-by"), "body": body.decode(),
                "headers": {k.lower(): v for k, v in r.getheaders()}})
print(json.dumps(out))
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


class SidecarL7Topology(Topology):
    name = "sidecar_l7_test"

    def build(self) -> None:
        self.add_node("node1")
        self.add_node("node2")
        self.label_namespace("default", {USE_WAYPOINT: "waypoint"})
        self.add_waypoint("waypoint", "node2")
        self.add_pod("client", "node1", labels={"app": "client"})
        self.add_pod("echo-v1", "node2", service_account="echo", labels={"app": "echo", "v": "1"})
        v2 = {"app": "echo", "v": "2", "flaky": "yes"}
        self.add_pod("echo-v2", "node1", service_account="echo", labels=v2)
        self.add_pod("greeter", "node2", labels={"app": "greeter"})
        self.add_pod("broken", "node2", labels={"flaky": "yes"})
        ports = {SERVICE_PORT: APP_PORT}
        self.add_service("echo", selector={"app": "echo"}, ports=ports)
        self.add_service("echo-v1", selector={"app": "echo", "v": "1"}, ports=ports)
        self.add_service("echo-v2", selector={"app": "echo", "v": "2"}, ports=ports)
        self.add_service("flaky", selector={"flaky": "yes"}, ports=ports)  # echo-v2 and broken
        self.add_http_route(
            "echo",
            services=["echo"],
            rules=[
                {"backends": [{"service": "echo-v1"}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                 "backends": [{"service": "echo-v2"}],
                 "filters": [{"type": "ResponseHeaderModifier",
                              "responseHeaderModifier": {"add": [{"name": "x-route",
                                                                  "value": "v2"}]}}]},
            ],
        )  # fmt: skip
        self.add_l7_policy(
            "no-admin", action="DENY", services=["echo"], rules=[{"to": [{"paths": ["/admin*"]}]}]
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from testbed.netlab import clean_all

    root = Path("/run/testbed-tests") / f"sidecar-l7-{tmp_path_factory.getbasetemp().name}"
    root.mkdir(parents=True, exist_ok=True)
    greeter: GreetingServer | None = None
    try:
        with Cluster(SidecarL7Topology(), mode="sidecar", root=root) as built:
            for name in ("echo-v1", "echo-v2"):
                argv = [sys.executable, "-m", "testbed.workloads.http_echo", "--name", name]
                built.pod(name).spawn([*argv, "--port", str(APP_PORT)], label="echo")
            built.pod("broken").spawn(
                [sys.executable, "-c", ALWAYS_503, str(APP_PORT)], label="broken"
            )
            for name in ("echo-v1", "echo-v2", "broken"):
                _await_http(built, name)
            greeter = GreetingServer(built.pod("greeter"))
            yield built
            greeter.close()
    finally:
        clean_all(root)
        shutil.rmtree(root, ignore_errors=True)


def _await_http(cluster: Cluster, name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    with cluster.pod(name).netns.entered():
        while True:
            try:
                socket.create_connection(("127.0.0.1", APP_PORT), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def get(cluster: Cluster, *paths: str, service: str = "echo") -> list[dict[str, object]]:
    address = cluster.services[service].vip
    argv = [sys.executable, "-c", GET, address, str(SERVICE_PORT), *paths]
    result = cluster.pod("client").run(argv, timeout=60)
    found: list[dict[str, object]] = json.loads(result.stdout.strip().splitlines()[-1])
    return found


def requests_total(pod: Pod, reporter: str) -> float:
    metrics = http_get(pod, 15020, "/metrics")[1].decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("istio_requests_total{") and f'reporter="{reporter}"' in line
    )


def test_routes_apply_in_the_client_sidecar(cluster: Cluster) -> None:
    plain, v2 = get(cluster, "/reviews", "/v2/reviews")
    assert (plain["status"], plain["served"]) == (200, "echo-v1")
    assert (v2["status"], v2["served"]) == (200, "echo-v2")
    headers = v2["headers"]
    assert isinstance(headers, dict)
    assert headers["x-route"] == "v2"  # ResponseHeaderModifier
    assert len(headers["x-echo-x-request-id"]) == 36  # Envoy's x-request-id
    assert headers["x-echo-x-forwarded-proto"] == "http"
    assert headers["x-echo-x-forwarded-for"] == cluster.pod("client").ip
    assert int(headers["x-envoy-upstream-service-time"]) >= 0


def test_default_retries_in_the_client_sidecar_hide_a_503_backend(cluster: Cluster) -> None:
    answers = get(cluster, *["/"] * 30, service="flaky")
    assert {a["status"] for a in answers} == {200}
    assert {a["served"] for a in answers} == {"echo-v2"}
    broken = cluster.pod("broken")
    assert requests_total(broken, "destination") > 0  # it was tried, and hidden


def test_l7_deny_in_the_server_sidecar(cluster: Cluster) -> None:
    [denied] = get(cluster, "/admin/x")
    assert (denied["status"], denied["body"]) == (403, "RBAC: access denied")


def test_http_load_grows_istio_requests_total_on_both_sidecars(cluster: Cluster) -> None:
    client, server = cluster.pod("client"), cluster.pod("echo-v1")
    before = requests_total(client, "source"), requests_total(server, "destination")
    url = f"http://{cluster.services['echo'].vip}:{SERVICE_PORT}/echo"
    argv = [sys.executable, "-m", "testbed.workloads.http_load", "--url", url, "--qps", "200",
            "--connections", "4", "--duration", "2", "--warmup", "0.5",
            "--payload", "1024"]  # fmt: skip
    report = json.loads(client.run(argv, timeout=60).stdout.strip().splitlines()[-1])
    assert report["errors"] == {} or not any(report["errors"].values()), report
    after = requests_total(client, "source"), requests_total(server, "destination")
    assert after[0] - before[0] >= 400  # every request, recorded or warm-up
    assert after[1] - before[1] >= 400  # all go to echo-v1 (the route's default rule)


def test_tcp_stays_l4_and_a_server_first_app_works(cluster: Cluster) -> None:
    client, greeter = cluster.pod("client"), cluster.pod("greeter")
    assert greeting(client, greeter.ip, timeout=5.0) == f"greeter {client.ip}"
    assert requests_total(greeter, "destination") == 0


@pytest.mark.parametrize("h1", [True, False], ids=["http1.1", "h2c"])
def test_h2load_through_both_sidecars_has_no_failed_requests(cluster: Cluster, h1: bool) -> None:
    if shutil.which("h2load") is None:
        pytest.skip("h2load (Debian package nghttp2-client) is not installed")
    server = cluster.pod("echo-v1")
    before = requests_total(server, "destination")
    url = f"http://{cluster.services['echo'].vip}:{SERVICE_PORT}/x?size=1024"
    argv = ["h2load", "-n", "300", "-c", "3", "-m", "4", url, *(["--h1"] if h1 else [])]
    result = cluster.pod("client").run(argv, timeout=60)
    assert "300 succeeded, 0 failed, 0 errored" in result.stdout, result.stdout
    assert requests_total(server, "destination") - before >= 300
