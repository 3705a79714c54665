"""ztunnel in inpod mode on a real two-node cluster, for each capture variant.

Pods: on node1 a captured client, a captured server1 and a captured client in another
namespace; on node2 a captured server2 and an uncaptured `outsider`
(istio.io/dataplane-mode: none). Every pod runs a test server on APP_PORT that greets with
"<pod name> <peer ip>" and then answers the sha256 of everything it received.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from hbone_probe import H2Connect
from podapps import APP_PORT, GreetingServer, connect, finish, greeting, read_line

from testbed.cluster import Cluster, Pod, Topology
from testbed.mesh.ca import CertificateAuthority, Identity
from testbed.redirect.base import http_get
from testbed.redirect.inpod import InPodMode, InPodOptions

OTHER_PORT = 9090
BLOCK = os.urandom(1 << 20)
BIG_TRANSFER_MB = 100


class MeshTopology(Topology):
    name = "ztunnel_test"

    def build(self) -> None:
        self.add_node("node1")
        self.add_node("node2")
        self.add_pod("client", "node1", labels={"app": "client", "role": "client"})
        self.add_pod(
            "server1", "node1", service_account="server", labels={"app": "server", "role": "server"}
        )
        self.add_pod("other", "node1", namespace="other", labels={"app": "other"})
        self.add_pod(
            "server2", "node2", service_account="server", labels={"app": "server", "role": "server"}
        )
        self.add_pod("outsider", "node2", labels={"istio.io/dataplane-mode": "none"})
        self.add_service("server", selector={"app": "server"}, ports=[APP_PORT])


# ---------------------------------------------------------------- a bulk transfer


def transfer(pod: Pod, ip: str, megabytes: int) -> tuple[str, str, str]:
    """Send `megabytes` MiB; (greeting, sha256 sent, sha256 the server computed)."""
    sent = hashlib.sha256()
    with connect(pod, ip, APP_PORT, timeout=60) as sock:
        hello = read_line(sock)
        for _ in range(megabytes):
            sock.sendall(BLOCK)
            sent.update(BLOCK)
        answer = finish(sock)
    return hello, sent.hexdigest(), answer


# ---------------------------------------------------------------- the cluster per variant


@dataclass
class Mesh:
    cluster: Cluster
    mode: InPodMode
    variant: str

    def pod(self, name: str) -> Pod:
        return self.cluster.pods[name]

    def metrics(self, node: str) -> str:
        return http_get(self.mode.ztunnels[node].pod, 15020, "/metrics")[1].decode()

    def count(self, node: str, name: str, *, at_least: float = 1, **labels: str) -> float:
        """A metric's sum over samples with `labels`, polled until `at_least` or a timeout
        (connections are counted as they close, a moment after the client saw the end)."""
        deadline = time.monotonic() + 5.0
        while True:
            value = counter(self.metrics(node), name, **labels)
            if value >= at_least or time.monotonic() > deadline:
                return value
            time.sleep(0.05)


VARIANTS = ["redirect", "tproxy", "nftables"]
T = TypeVar("T")


def every_variant(test: T) -> T:
    """Run this test with each capture variant; the others are variant-independent and run
    with the default (redirect) only."""
    test.every_variant = True  # type: ignore[attr-defined]
    return test


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mesh" in metafunc.fixturenames:
        variants = VARIANTS if getattr(metafunc.function, "every_variant", False) else VARIANTS[:1]
        metafunc.parametrize("mesh", variants, indirect=True, scope="module")


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """One cluster per variant, shared by the module's tests."""
    mode = InPodMode(InPodOptions(inpod_variant=request.param))
    cluster = Cluster(MeshTopology(), mode)
    servers: list[GreetingServer] = []
    try:
        cluster.start()
        servers = [
            GreetingServer(pod, port)
            for pod in cluster.pods.values()
            for port in (APP_PORT, OTHER_PORT)
        ]
        yield Mesh(cluster, mode, request.param)
    finally:
        for server in servers:
            server.close()
        cluster.stop()


def counter(metrics: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in metrics.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------- traffic, every variant


@every_variant
@pytest.mark.parametrize("server", ["server1", "server2"], ids=["same-node", "cross-node"])
def test_captured_to_captured_carries_bytes_intact(mesh: Mesh, server: str) -> None:
    client = mesh.pod("client")
    hello, sent, received = transfer(client, mesh.pod(server).ip, BIG_TRANSFER_MB)
    assert hello == f"{server} {client.ip}"  # the app sees the client pod's address
    assert received == sent
    carried = mesh.count(
        "node1", "istio_tcp_received_bytes_total", destination_workload=server,
        connection_security_policy="mutual_tls", at_least=BIG_TRANSFER_MB << 20,
    )  # fmt: skip
    assert carried >= BIG_TRANSFER_MB << 20
    node = mesh.pod(server).node  # the destination ztunnel counts the stream too
    delivered = mesh.count(
        node, "istio_tcp_received_bytes_total", reporter="destination",
        destination_workload=server, at_least=BIG_TRANSFER_MB << 20,
    )  # fmt: skip
    assert delivered >= BIG_TRANSFER_MB << 20


@every_variant
def test_captured_to_uncaptured_passes_through(mesh: Mesh) -> None:
    client, outsider = mesh.pod("client"), mesh.pod("outsider")
    assert greeting(client, outsider.ip) == f"outsider {client.ip}"
    closed = mesh.count(
        "node1", "istio_tcp_connections_closed_total", destination_workload="outsider",
        connection_security_policy="unknown", response_flags="-",
    )  # fmt: skip
    assert closed >= 1


@every_variant
def test_uncaptured_to_captured_goes_through_15006(mesh: Mesh) -> None:
    outsider, server1 = mesh.pod("outsider"), mesh.pod("server1")
    assert greeting(outsider, server1.ip) == f"server1 {outsider.ip}"
    closed = mesh.count(
        "node1", "istio_tcp_connections_closed_total", reporter="destination",
        source_workload="outsider", source_principal="unknown",
    )  # fmt: skip
    assert closed >= 1


@every_variant
def test_service_vip_spreads_connections(mesh: Mesh) -> None:
    vip = mesh.cluster.services["server"].vip
    answers = [greeting(mesh.pod("client"), vip) for _ in range(6)]
    client_ip = mesh.pod("client").ip
    assert set(answers) == {f"server1 {client_ip}", f"server2 {client_ip}"}


# ---------------------------------------------------------------- wire and protocol


def test_only_tls_between_nodes(mesh: Mesh) -> None:
    node = mesh.cluster.nodes["node1"].netns
    capture = node.spawn(
        ["tcpdump", "-i", "eth0", "-n", "-A", "-U", "-l", "tcp"], label="tcpdump-test"
    )
    try:
        time.sleep(0.8)  # tcpdump needs a moment before it captures
        marker = b"PLAINTEXT-MARKER-" * 64
        with connect(mesh.pod("client"), mesh.pod("server2").ip, APP_PORT) as sock:
            read_line(sock)
            sock.sendall(marker)
            sock.shutdown(socket.SHUT_WR)
            assert len(sock.recv(128)) == 64
        time.sleep(0.5)
    finally:
        capture.terminate()
    dump = capture.output()
    assert ".15008" in dump
    assert "PLAINTEXT-MARKER" not in dump


def _write_cert(ca: CertificateAuthority, identity: Identity, folder: Path) -> list[str]:
    cert, key, root = ca.issue(identity).write(folder)
    return ["-cert", str(cert), "-key", str(key), "-CAfile", str(root)]


def _s_client(pod: Pod, target: str, cert_args: list[str]) -> str:
    """openssl's report. Under TLS 1.3 the server judges the client certificate after the
    client finished, so stdin stays open a moment to read its verdict (an alert, or the
    HTTP/2 SETTINGS); `cat -v` makes those binary frames printable."""
    command = ["openssl", "s_client", "-connect", target, "-alpn", "h2", "-tls1_3", *cert_args]
    shell = "sleep 0.5 | " + " ".join(shlex.quote(arg) for arg in command) + " 2>&1 | cat -v"
    return pod.run(["sh", "-c", shell], input="", check=False, timeout=10).stdout


def _tls_failed(report: str) -> bool:
    """The server refused the session: an alert, or the connection cut without one."""
    return "alert" in report or "unexpected eof" in report


def test_openssl_handshake_needs_a_testbed_certificate(mesh: Mesh, tmp_path: Path) -> None:
    assert mesh.mode.control is not None
    td = mesh.mode.trust_domain
    outsider, target = mesh.pod("outsider"), f"{mesh.pod('server1').ip}:15008"
    good = _s_client(
        outsider,
        target,
        _write_cert(mesh.mode.control.ca, Identity(td, "default", "tester"), tmp_path / "good"),
    )
    assert "ALPN protocol: h2" in good and "Verify return code: 0 (ok)" in good
    assert not _tls_failed(good)
    for name, ca in [
        ("other-ca", CertificateAuthority.create(td)),
        ("other-td", CertificateAuthority.create("other.example")),
    ]:
        args = _write_cert(ca, Identity(ca.trust_domain, "default", "tester"), tmp_path / name)
        args[-1] = str(tmp_path / "good" / "root-cert.pem")  # still trust the testbed root
        assert _tls_failed(_s_client(outsider, target, args)), name


def test_independent_h2_client_gets_200_400_401_503(mesh: Mesh, tmp_path: Path) -> None:
    assert mesh.mode.control is not None
    identity = Identity(mesh.mode.trust_domain, "default", "tester")
    mesh.mode.control.ca.issue(identity).write(tmp_path)
    server1, server2 = mesh.pod("server1"), mesh.pod("server2")
    client = H2Connect(mesh.pod("outsider"), server1.ip, tmp_path)
    try:
        assert client.status(f"{server1.ip}:{APP_PORT}") == 200
        assert client.status(f"{server2.ip}:{APP_PORT}") == 400
        assert client.status(f"{server1.ip}:1") == 503  # nothing listens there
        assert client.status(f"{server1.ip}:15001") == 503  # ztunnel's own port, as Istio's
        with policy(
            mesh, "deny-tester", action="DENY", rules=[{"principals": [identity.principal]}]
        ):
            assert client.status(f"{server1.ip}:{APP_PORT}") == 401
    finally:
        client.close()


# ---------------------------------------------------------------- policies


@contextlib.contextmanager
def policy(mesh: Mesh, name: str, **spec: object) -> Iterator[None]:
    topology = mesh.cluster.topology
    topology.add_policy(name, **spec)  # type: ignore[arg-type]
    try:
        mesh.mode.update_policies(topology)
        yield
    finally:
        topology.remove_policy(name)
        mesh.mode.update_policies(topology)


DENY_RULES = {
    "principal": [{"principals": ["cluster.local/ns/default/sa/client"]}],
    "namespace": [{"namespaces": ["default"]}],
    "port": [{"ports": [APP_PORT]}],
}


@pytest.mark.parametrize("by", sorted(DENY_RULES))
def test_deny_policy_stops_traffic_until_removed(mesh: Mesh, by: str) -> None:
    client, server2 = mesh.pod("client"), mesh.pod("server2")
    expected = f"server2 {client.ip}"
    deny = {"response_flags": "DENY", "source_workload": "client"}
    denied_before = mesh.count("node2", "istio_tcp_connections_closed_total", **deny, at_least=1)
    with policy(
        mesh, f"deny-by-{by}", action="DENY", selector={"app": "server"}, rules=DENY_RULES[by]
    ):
        assert greeting(client, server2.ip) is None
        at_least = denied_before + 1
        denied = mesh.count(
            "node2", "istio_tcp_connections_closed_total", **deny, at_least=at_least
        )
        assert denied >= at_least
        if by == "port":  # another port of the same pod is still allowed
            assert greeting(client, server2.ip, OTHER_PORT) == expected
    assert greeting(client, server2.ip) == expected


def test_allow_policy_admits_only_its_principals(mesh: Mesh) -> None:
    client, other, server1 = mesh.pod("client"), mesh.pod("other"), mesh.pod("server1")
    rules = [{"principals": ["cluster.local/ns/default/sa/client"]}]
    with policy(mesh, "allow-client", action="ALLOW", selector={"app": "server"}, rules=rules):
        assert greeting(client, server1.ip) == f"server1 {client.ip}"
        assert greeting(other, server1.ip) is None
    assert greeting(other, server1.ip) == f"server1 {other.ip}"


# ---------------------------------------------------------------- robustness


def test_ztunnel_restart_reenrolls_pods(mesh: Mesh) -> None:
    old_pid = mesh.mode.proxy_pids()["ztunnel-node1"]
    mesh.mode.restart_ztunnel("node1")
    assert mesh.mode.proxy_pids()["ztunnel-node1"] != old_pid
    assert set(mesh.mode.config_dump("node1")["pods"]) == {
        "default-client",
        "default-server1",
        "other-other",
    }
    client = mesh.pod("client")
    assert greeting(client, mesh.pod("server1").ip) == f"server1 {client.ip}"
    assert greeting(client, mesh.pod("server2").ip) == f"server2 {client.ip}"


@pytest.mark.parametrize("port", [15001, 15006, 15008])
def test_garbage_on_a_ztunnel_port_closes_only_that_connection(mesh: Mesh, port: int) -> None:
    client, server1 = mesh.pod("client"), mesh.pod("server1")
    # 15001 is reached by a captured app dialling it; 15006/15008 from outside the pod.
    sender = client if port == 15001 else mesh.pod("outsider")
    with connect(client, mesh.pod("server2").ip, APP_PORT) as survivor:
        read_line(survivor)
        # ztunnel refuses a connection to its own port at once; the reset may even beat
        # connect() returning. Either way that connection is closed, as required.
        refused = contextlib.suppress(ConnectionResetError)
        with refused, connect(sender, server1.ip, port) as garbage:
            with contextlib.suppress(OSError):
                garbage.sendall(b"\x16\x03\x01 this is not TLS nor HTTP/2\r\n\r\n" * 20)
            with contextlib.suppress(OSError):
                assert garbage.recv(4096) == b""
        survivor.sendall(b"still here")
        survivor.shutdown(socket.SHUT_WR)
        assert survivor.recv(128).decode() == hashlib.sha256(b"still here").hexdigest()
    assert greeting(client, server1.ip) == f"server1 {client.ip}"


def test_unenrolled_pod_leaves_the_mesh_and_can_come_back(mesh: Mesh) -> None:
    client, server1 = mesh.pod("client"), mesh.pod("server1")
    mtls = {"destination_workload": "server1", "reporter": "source"}
    mesh.mode.unenroll(server1)
    try:
        assert "not captured" in mesh.mode.describe_pod(server1)
        assert "ISTIO" not in server1.run(["iptables-save"]).stdout
        assert "default-server1" not in mesh.mode.config_dump("node1")["pods"]
        plain_before = mesh.count("node1", "istio_tcp_connections_closed_total", at_least=0,
                                  connection_security_policy="unknown", **mtls)  # fmt: skip
        assert greeting(client, server1.ip) == f"server1 {client.ip}"  # passed through
        plain = mesh.count("node1", "istio_tcp_connections_closed_total",
                           connection_security_policy="unknown", at_least=plain_before + 1,
                           **mtls)  # fmt: skip
        assert plain >= plain_before + 1
    finally:
        mesh.mode.enroll(server1)
    assert "default-server1" in mesh.mode.config_dump("node1")["pods"]
    assert greeting(mesh.pod("outsider"), server1.ip) == f"server1 {mesh.pod('outsider').ip}"
    assert greeting(client, server1.ip) == f"server1 {client.ip}"


@every_variant
def test_mode_reports_facts_pids_and_rules(mesh: Mesh) -> None:
    assert mesh.mode.facts()["inpod_variant"] == mesh.variant
    pids = mesh.mode.proxy_pids()
    assert set(pids) == {"ztunnel-node1", "ztunnel-node2"}
    rules = mesh.mode.describe_pod(mesh.pod("client"))
    assert ("redirect to :15001" if mesh.variant == "nftables" else "--to-ports 15001") in rules
    assert "not captured" in mesh.mode.describe_pod(mesh.pod("outsider"))
    ready = http_get(mesh.mode.ztunnels["node1"].pod, 15021, "/healthz/ready")
    assert ready[0] == 200
    dump = mesh.mode.config_dump("node2")
    assert re.fullmatch("[0-9a-f]{64}", dump["configDigest"])
    assert dump["certificates"] == ["default/server"]


@pytest.mark.parametrize("by", ["principal", "port"])
def test_a_deny_closes_a_running_transfer_within_2s_and_blocks_new_ones(
    mesh: Mesh, by: str
) -> None:
    """Istio's ztunnel re-checks open connections on a policy change."""
    client, server2 = mesh.pod("client"), mesh.pod("server2")
    ended: list[float] = []
    sock = connect(client, server2.ip, APP_PORT, timeout=10)
    assert read_line(sock) == f"server2 {client.ip}"

    def send_until_closed() -> None:
        with contextlib.suppress(OSError):
            while True:
                sock.sendall(BLOCK)
        ended.append(time.monotonic())

    sender = threading.Thread(target=send_until_closed, daemon=True)
    sender.start()
    try:
        time.sleep(0.5)
        assert not ended, "the transfer ended before any policy"
        pushed = time.monotonic()
        with policy(mesh, f"deny-running-{by}", action="DENY", rules=DENY_RULES[by]):
            sender.join(timeout=5)
            assert ended, "the denied transfer kept running"
            assert ended[0] - pushed < 2.0
            assert greeting(client, server2.ip, timeout=3) is None
    finally:
        sock.close()
    assert greeting(client, server2.ip) == f"server2 {client.ip}"


def test_admin_port_is_localhost_only_and_metrics_ready_are_not(mesh: Mesh) -> None:
    """Istio binds the admin port (its /config_dump names every workload) to localhost."""
    ztunnel = mesh.mode.ztunnels["node2"].pod
    outsider, client = mesh.pod("outsider"), mesh.pod("client")
    with pytest.raises(ConnectionRefusedError):
        connect(outsider, ztunnel.ip, 15000).close()
    with connect(client, ztunnel.ip, 15000) as sock:  # captured: ztunnel passes it through
        sock.sendall(b"GET /config_dump HTTP/1.1\r\n\r\n")
        with contextlib.suppress(OSError):
            assert sock.recv(100) == b""
    with connect(outsider, ztunnel.ip, 15020) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
    status, _ = http_get(ztunnel, 15000, "/config_dump")  # from inside its namespace
    assert status == 200


def test_connections_lists_what_both_ztunnels_did(mesh: Mesh) -> None:
    client, server2 = mesh.pod("client"), mesh.pod("server2")
    assert greeting(client, server2.ip) == f"server2 {client.ip}"
    node1, node2 = mesh.mode.ztunnels["node1"].pod, mesh.mode.ztunnels["node2"].pod
    target = f"{server2.ip}:{APP_PORT}"

    def records(pod: Pod) -> list[dict[str, object]]:
        deadline = time.monotonic() + 5
        while True:
            body = json.loads(http_get(pod, 15000, "/connections")[1])
            found = [
                r
                for r in body["connections"]
                if r["original_dst"] == target
                and str(r["peer"]).startswith(f"{client.ip}:")
                and r["closed"]
            ]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    outbound = records(node1)[-1]
    assert outbound["proxy"] == "ztunnel" and outbound["listener"] == 15001
    assert outbound["direction"] == "outbound" and outbound["path"] == "hbone"
    assert outbound["upstream"] == f"{server2.ip}:15008" and outbound["verdict"] == "allow"
    assert outbound["src_identity"] == "spiffe://cluster.local/ns/default/sa/client"
    assert isinstance(outbound["bytes_received"], int) and outbound["bytes_received"] > 0
    inbound = records(node2)[-1]
    assert inbound["listener"] == 15008 and inbound["direction"] == "inbound"
    assert inbound["src_identity"] == outbound["src_identity"]
    assert inbound["dst_identity"] == "spiffe://cluster.local/ns/default/sa/server"
    last = int(str(json.loads(http_get(node1, 15000, "/connections")[1])["connections"][-1]["id"]))
    later = json.loads(http_get(node1, 15000, f"/connections?since={last}")[1])
    assert later == {"connections": []}
