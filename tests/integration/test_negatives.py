"""The mTLS/authz negatives matrix: what a real ztunnel's 15008 and a real waypoint's 15008
answer to every kind of bad client, and that none of it reaches the app.

One inpod cluster for the module, one node: `app` (captured; an L4 policy denies the identity
default/denied), `web` behind the service `web` that uses the waypoint `waypoint` (an L7 policy
denies default/denied), and `prober`, out of the mesh, from which an independent client
(Python's ssl + the h2 library, tests/tls_probe.py; none of our HBONE code) dials 15008
directly. Each app runs a server that counts the connections it accepted and the bytes it
read; every refused case must leave both counts where they were, and a good client (the
control) must move them, so the counting can fail.

Istio's answers, from istio/ztunnel:
- TLS (src/tls/workload.rs: TrustDomainVerifier for the server, IdentityVerifier for the
  client, errors turned into alerts by rustls' `From<CertificateError> for AlertDescription`):
  no client certificate -> certificate_required; an issuer we do not trust -> unknown_ca (a
  foreign root with our root's name, as every Istio root is named O=<trust domain>: its
  signature fails -> decrypt_error); expired or not yet valid -> certificate_expired; no URI
  SAN in our trust domain (another trust domain, no SAN, a SAN that is not SPIFFE) ->
  certificate_unknown. src/tls/lib.rs: TLS 1.3 only -> protocol_version; ALPN h2 only, an
  offer without it -> no_application_protocol.
- HTTP (src/proxy/inbound.rs): a CONNECT whose authority is no address, or an address that
  is not the pod's -> 400; a port of ztunnel's own (Config::illegal_ports) or one nothing
  listens on -> 503; an identity the policy denies -> 401.
Istio's waypoint is Envoy; ours shares the HBONE server and its TLS contexts with ztunnel, so
it is held to the same alerts, and answers L7 policy with 403 as Envoy's RBAC filter does.
Where we differ from Istio or could not check it (asserted as we behave; none reaches the
app): with no ALPN offered at all OpenSSL runs no ALPN callback, so our server closes after
the handshake (rustls, as we read it, carries on without ALPN and ztunnel would speak h2);
plaintext bytes get no TLS alert from OpenSSL (it recognises an HTTP request and closes),
where rustls answers a record it cannot parse with an alert; a CONNECT to a service port the
service does not have gets 400 from our waypoint (not a service of the mesh); what Envoy
answers there was not checked.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from podapps import connect
from tls_probe import client_tls, plaintext_answer, probe

from testbed.cluster import Cluster, Pod, Topology
from testbed.cluster.waypoints import USE_WAYPOINT
from testbed.mesh.ca import CA_CERT_FILE, CA_KEY_FILE
from testbed.mesh.hbone.testcerts import Identity, TestPki
from testbed.netlab.tcpserver import NetnsTcpServer
from testbed.redirect import create_mode
from testbed.redirect.base import MeshMode
from testbed.redirect.inpod import InPodMode

APP_PORT = 8080
SERVICE_PORT = 9080
UNSERVED_PORT = 9999
HBONE_PORT = 15008
# The ports of ztunnel's own listeners and endpoints; a CONNECT to any of them gets 503.
ZTUNNEL_OWN_PORTS = [15008, 15001, 15006, 15000, 15020, 15021]
DENIED = "denied"  # the service account both policies deny
REQUEST = b"GET / HTTP/1.1\r\nhost: web\r\n\r\n"
HOUR = timedelta(hours=1)


class NegativesTopology(Topology):
    name = "negatives_test"

    def build(self) -> None:
        self.add_node("node1")
        self.add_pod("app", "node1", service_account="app", labels={"app": "app"})
        self.add_pod("web", "node1", service_account="web", labels={"app": "web"})
        self.add_pod("prober", "node1", labels={"istio.io/dataplane-mode": "none"})
        self.add_waypoint("waypoint", "node1")
        self.add_service(
            "web",
            selector={"app": "web"},
            ports={SERVICE_PORT: APP_PORT},
            labels={USE_WAYPOINT: "waypoint"},
        )
        denied = [f"cluster.local/ns/default/sa/{DENIED}"]
        self.add_policy(
            "deny-denied", action="DENY", selector={"app": "app"}, rules=[{"principals": denied}]
        )
        self.add_l7_policy(
            "deny-denied-l7",
            action="DENY",
            services=["web"],
            rules=[{"from": [{"principals": denied}]}],
        )


class CountingServer(NetnsTcpServer):
    """Counts accepted connections and bytes read; answers each HTTP request 200."""

    def __init__(self, pod: Pod, port: int = APP_PORT) -> None:
        self.accepted = 0
        self.received = 0
        self._lock = threading.Lock()
        super().__init__(pod.netns, port, backlog=64)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.accepted, self.received

    def serve(self, conn: socket.socket, peer_ip: str) -> None:
        with self._lock:
            self.accepted += 1
        pending = b""
        while chunk := conn.recv(65536):
            with self._lock:
                self.received += len(chunk)
            pending += chunk
            while b"\r\n\r\n" in pending:
                _, pending = pending.split(b"\r\n\r\n", 1)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")


@dataclass
class Negatives:
    cluster: Cluster
    mode: InPodMode
    apps: dict[str, CountingServer]
    pki: TestPki  # our mesh's CA, for leaves it would never issue
    certs: Path

    def pod(self, name: str) -> Pod:
        return self.cluster.pod(name)


@pytest.fixture(scope="module")
def negatives(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Negatives]:
    from testbed.netlab import clean_all

    root = Path("/run/testbed-tests") / f"negatives-{tmp_path_factory.getbasetemp().name}"
    root.mkdir(parents=True, exist_ok=True)
    certs = tmp_path_factory.mktemp("negative-certs")
    apps: dict[str, CountingServer] = {}
    try:
        with Cluster(NegativesTopology(), create_mode("inpod"), root=root) as built:
            mode = built.mode
            assert isinstance(mode, InPodMode) and mode.control is not None
            mode.control.ca.save(certs / "mesh-ca")
            ca_files = (certs / "mesh-ca" / CA_CERT_FILE, certs / "mesh-ca" / CA_KEY_FILE)
            pki = TestPki(certs / "mesh", mode.trust_domain, root=ca_files)
            apps = {name: CountingServer(built.pod(name)) for name in ("app", "web")}
            yield Negatives(built, mode, apps, pki, certs)
    finally:
        for server in apps.values():
            server.close()
        clean_all(root)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Target:
    """Where the probe dials and what it CONNECTs to, and whose app must see nothing."""

    address: tuple[str, int]
    authority: str
    app: str


def target_of(n: Negatives, name: str) -> Target:
    if name == "ztunnel":
        app = n.pod("app")
        return Target((app.ip, HBONE_PORT), f"{app.ip}:{APP_PORT}", "app")
    waypoint = n.pod("waypoint")
    vip = n.cluster.services["web"].vip
    return Target((waypoint.ip, HBONE_PORT), f"{vip}:{SERVICE_PORT}", "web")


def leaf(n: Negatives, case: str) -> Identity | None:
    """The client certificate of a TLS case (None: present none)."""
    pki, td = n.pki, n.mode.trust_domain
    if case == "no client certificate":
        return None
    if case == "foreign CA":
        return TestPki(n.certs / "foreign", "other.mesh").identity("default", "tester")
    if case == "foreign CA with our root's name":
        return TestPki(n.certs / "foreign-same-name", td).identity("default", "tester")
    if case == "wrong trust domain, our CA":
        other = TestPki(n.certs / "other-td", "example.org", root=_mesh_root(n))
        return other.identity("default", "tester")
    if case == "expired":
        return pki.identity("default", "expired", valid_from=-2 * HOUR, valid_for=HOUR)
    if case == "not yet valid":
        return pki.identity("default", "early", valid_from=HOUR, valid_for=HOUR)
    if case == "SAN missing":
        return pki.identity("default", "nosan", sans=[])
    if case == "SAN not SPIFFE":
        return pki.identity("default", "https", sans=["https://tester.default.example/"])
    if case == "another identity (denied by policy)":
        return pki.identity("default", DENIED)
    return pki.identity("default", "tester")


def _mesh_root(n: Negatives) -> tuple[Path, Path]:
    folder = n.certs / "mesh-ca"
    return folder / CA_CERT_FILE, folder / CA_KEY_FILE


def attempt(n: Negatives, target: Target, case: str, authority: str | None = None) -> str:
    """Run one case from the prober; the outcome as tls_probe reports it."""
    sock = connect(n.pod("prober"), *target.address, timeout=10)
    sock.settimeout(10)
    if case == "plaintext bytes":
        answer = plaintext_answer(sock, f"CONNECT {target.authority} HTTP/1.1\r\n\r\n".encode())
        return "http answer" if b"HTTP/" in answer else "closed, no HTTP"
    who = leaf(n, case)
    context = client_tls(
        n.pki.roots,
        who.cert if who else None,
        who.key if who else None,
        tls12_only=case == "TLS 1.2 only",
        alpn={"no ALPN": [], "ALPN http/1.1": ["http/1.1"]}.get(case),
    )
    return probe(sock, context, authority or target.authority, REQUEST)


Authority = Callable[[Negatives], str]

# case -> (outcome at ztunnel's 15008, at the waypoint's 15008; None: not a case there)
TLS_CASES: dict[str, tuple[str, str | None]] = {
    "good certificate (control)": ("http 200", "http 200"),
    "no client certificate": ("alert certificate_required", "alert certificate_required"),
    "foreign CA": ("alert unknown_ca", "alert unknown_ca"),
    "foreign CA with our root's name": ("alert decrypt_error", "alert decrypt_error"),
    "wrong trust domain, our CA": ("alert certificate_unknown", "alert certificate_unknown"),
    "expired": ("alert certificate_expired", "alert certificate_expired"),
    "not yet valid": ("alert certificate_expired", "alert certificate_expired"),
    "SAN missing": ("alert certificate_unknown", "alert certificate_unknown"),
    "SAN not SPIFFE": ("alert certificate_unknown", "alert certificate_unknown"),
    "another identity (denied by policy)": ("status 401", "http 403"),
    "TLS 1.2 only": ("alert protocol_version", "alert protocol_version"),
    "no ALPN": ("closed", "closed"),
    "ALPN http/1.1": ("alert no_application_protocol", "alert no_application_protocol"),
    "plaintext bytes": ("closed, no HTTP", "closed, no HTTP"),
}

# CONNECT cases, with a good certificate: case -> (authority, expected) per target
CONNECT_CASES: dict[str, dict[str, tuple[Authority, str]]] = {
    "CONNECT bad authority": {
        "ztunnel": (lambda n: "not-an-address", "status 400"),
        "waypoint": (lambda n: "not-an-address", "status 400"),
    },
    "CONNECT another pod's address": {
        "ztunnel": (lambda n: f"{n.pod('web').ip}:{APP_PORT}", "status 400"),
    },
    "CONNECT a port the pod does not serve": {
        "ztunnel": (lambda n: f"{n.pod('app').ip}:{UNSERVED_PORT}", "status 503"),
        "waypoint": (lambda n: f"{n.cluster.services['web'].vip}:{UNSERVED_PORT}", "status 400"),
    },
    **{
        f"CONNECT ztunnel's own port {port}": {
            "ztunnel": (lambda n, port=port: f"{n.pod('app').ip}:{port}", "status 503"),  # type: ignore[misc]
        }
        for port in ZTUNNEL_OWN_PORTS
    },
}


def _matrix() -> list[object]:
    rows: list[object] = []
    for case, (at_ztunnel, at_waypoint) in TLS_CASES.items():
        rows.append(pytest.param("ztunnel", case, None, at_ztunnel, id=f"ztunnel-{case}"))
        if at_waypoint is not None:
            rows.append(pytest.param("waypoint", case, None, at_waypoint, id=f"waypoint-{case}"))
    for case, targets in CONNECT_CASES.items():
        for target, (authority, expected) in targets.items():
            rows.append(pytest.param(target, case, authority, expected, id=f"{target}-{case}"))
    return rows


@pytest.mark.parametrize(("target_name", "case", "authority", "expected"), _matrix())
def test_refusal_matches_istio_and_nothing_reaches_the_app(
    negatives: Negatives,
    target_name: str,
    case: str,
    authority: Authority | None,
    expected: str,
) -> None:
    target = target_of(negatives, target_name)
    app = negatives.apps[target.app]
    before = app.counts()
    outcome = attempt(negatives, target, case, authority(negatives) if authority else None)
    assert outcome == expected
    time.sleep(0.3)  # a connection to the app would be accepted by now
    if case == "good certificate (control)":
        accepted, received = app.counts()
        assert accepted > before[0] and received > before[1], "the control reached no app"
    else:
        assert app.counts() == before, f"{case}: something reached the {target.app} app"


def test_admin_is_refused_from_pods_and_metrics_and_readiness_answer(
    negatives: Negatives,
) -> None:
    """Istio binds ztunnel's and Envoy's admin port 15000 to localhost; metrics (15020) and
    readiness (15021) stay reachable from the pod network."""
    prober = negatives.pod("prober")
    ztunnel = negatives.mode.ztunnels["node1"].pod
    assert isinstance(negatives.mode, MeshMode)
    for pod in (ztunnel, negatives.pod("waypoint")):
        with pytest.raises(ConnectionRefusedError):
            connect(prober, pod.ip, 15000).close()
        for port, path in ((15020, "/metrics"), (15021, "/healthz/ready")):
            with connect(prober, pod.ip, port) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
                assert sock.recv(100).startswith(b"HTTP/1.1 200"), (pod.name, port)
