"""Inpod capture rules in real namespaces: installed == reference, removal is complete,
and traffic really is captured (REDIRECT / TPROXY / nftables) except ztunnel's own.
The sidecar (istio-iptables) rules are checked the same way at the end."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from testbed.mesh import podsockets
from testbed.netlab import nsutil
from testbed.netlab.netns import Netns
from testbed.redirect import inpod_rules as ir
from testbed.redirect import sidecar_rules

POD_IP, PEER_IP = "10.77.0.1", "10.77.0.2"
APP_PORT = 8080
MODES: list[tuple[ir.Variant, ir.Backend]] = [
    ("redirect", "iptables"),
    ("tproxy", "iptables"),
    ("redirect", "nftables"),
]


@dataclass
class PodAndPeer:
    pod: Netns
    peer: Netns
    pod_fd: int
    peer_fd: int


@pytest.fixture
def lab() -> Iterator[PodAndPeer]:
    """A pod netns and a peer netns joined by a veth pair, both with lo up."""
    tag = uuid.uuid4().hex[:6]
    names = [f"tbt-inpod-{tag}-pod", f"tbt-inpod-{tag}-peer"]
    fds: list[int] = []
    try:
        for name in names:
            nsutil.create_netns(name)
            fds.append(os.open(nsutil.netns_path(name), os.O_RDONLY))
        pod, peer = Netns(names[0]), Netns(names[1])
        pod.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "eth0", "netns", peer.name])
        for ns, ip in ((pod, POD_IP), (peer, PEER_IP)):
            ns.run(["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
            ns.run(["ip", "link", "set", "eth0", "up"])
            ns.run(["ip", "link", "set", "lo", "up"])
        yield PodAndPeer(pod, peer, fds[0], fds[1])
    finally:
        for fd in fds:
            os.close(fd)
        for name in names:
            nsutil.delete_netns(name)


@pytest.mark.parametrize(("variant", "backend"), MODES)
def test_install_matches_reference_and_uninstall_removes_all(
    lab: PodAndPeer, variant: ir.Variant, backend: ir.Backend
) -> None:
    for _ in range(2):  # installing twice must not duplicate anything
        ir.install(lab.pod, variant, backend)
    assert ir.installed_rules(lab.pod, backend) == ir.expected_rules(variant, backend)
    assert ir.installed_policy_routes(lab.pod) == [
        "32764:\tfrom all fwmark 0x111/0xfff lookup 100",
        "local default dev lo scope host",
    ]
    for _ in range(2):
        ir.uninstall(lab.pod)
    assert ir.installed_rules(lab.pod, backend) == {}
    assert ir.installed_policy_routes(lab.pod) == []
    assert "ISTIO" not in lab.pod.run(["iptables-save"]).stdout
    assert "istio" not in lab.pod.run(["nft", "list", "ruleset"]).stdout


def test_switching_variants_leaves_only_the_new_rules(lab: PodAndPeer) -> None:
    ir.install(lab.pod, "tproxy")
    ir.install(lab.pod, "redirect")
    assert ir.installed_rules(lab.pod, "iptables") == ir.expected_rules("redirect", "iptables")
    ir.install(lab.pod, "redirect", "nftables")
    assert ir.installed_rules(lab.pod, "iptables") == {}
    assert ir.installed_rules(lab.pod, "nftables") == ir.expected_rules("redirect", "nftables")
    with pytest.raises(ValueError):
        ir.install(lab.pod, "tproxy", "nftables")


def _accept(listener: socket.socket) -> socket.socket:
    listener.settimeout(3.0)
    conn, _ = listener.accept()
    return conn


def _connect(netns_fd: int, dst: tuple[str, int], *, mark: int | None) -> socket.socket:
    sock = podsockets.socket_in_netns(netns_fd, mark=mark)
    sock.settimeout(3.0)
    sock.connect(dst)
    return sock


def _nothing_waiting(listener: socket.socket) -> bool:
    listener.setblocking(False)
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


@pytest.mark.parametrize(("variant", "backend"), MODES)
def test_traffic_is_captured(lab: PodAndPeer, variant: ir.Variant, backend: ir.Backend) -> None:
    ir.install(lab.pod, variant, backend)
    tproxy = variant == "tproxy"
    outbound = podsockets.listen_in_netns(lab.pod_fd, ir.OUTBOUND_PORT)
    inbound = podsockets.listen_in_netns(lab.pod_fd, ir.INBOUND_PLAINTEXT_PORT, transparent=tproxy)
    hbone = podsockets.listen_in_netns(lab.pod_fd, ir.INBOUND_HBONE_PORT, transparent=tproxy)
    peer_app = podsockets.listen_in_netns(lab.peer_fd, APP_PORT, mark=None)
    opened = [outbound, inbound, hbone, peer_app]
    try:
        # the app's outbound connection lands on ztunnel's 15001, not at the peer
        opened.append(_connect(lab.pod_fd, (PEER_IP, APP_PORT), mark=None))
        captured = _accept(outbound)
        opened.append(captured)
        assert podsockets.original_dst(captured) == (PEER_IP, APP_PORT)
        assert _nothing_waiting(peer_app)

        # ztunnel's own sockets (SO_MARK 0x539) go out untouched
        opened.append(_connect(lab.pod_fd, (PEER_IP, APP_PORT), mark=podsockets.INPOD_MARK))
        direct = _accept(peer_app)
        opened.append(direct)
        assert direct.getsockname() == (PEER_IP, APP_PORT)

        # inbound plaintext to any port lands on 15006 with the original destination kept
        opened.append(_connect(lab.peer_fd, (POD_IP, 80), mark=None))
        inbound_conn = _accept(inbound)
        opened.append(inbound_conn)
        if tproxy:
            assert inbound_conn.getsockname() == (POD_IP, 80)
        else:
            assert podsockets.original_dst(inbound_conn) == (POD_IP, 80)

        # HBONE to 15008 reaches ztunnel's 15008 listener
        opened.append(_connect(lab.peer_fd, (POD_IP, ir.INBOUND_HBONE_PORT), mark=None))
        hbone_conn = _accept(hbone)
        opened.append(hbone_conn)
        assert hbone_conn.getsockname() == (POD_IP, ir.INBOUND_HBONE_PORT)
    finally:
        for sock in opened:
            sock.close()


# ---------------------------------------------------------------- sidecar (istio-iptables)


@pytest.mark.parametrize("dns_servers", [(), ("10.96.0.2",)], ids=["no-dns", "dns"])
@pytest.mark.parametrize("exempt", ["uid", "mark"])
def test_sidecar_install_and_uninstall(
    lab: PodAndPeer, exempt: sidecar_rules.Exempt, dns_servers: tuple[str, ...]
) -> None:
    for _ in range(2):
        sidecar_rules.install(lab.pod, exempt, dns_servers=dns_servers)
    installed = sidecar_rules.installed_rules(lab.pod)
    assert installed == sidecar_rules.expected_rules(exempt, dns_servers=dns_servers)
    sidecar_rules.uninstall(lab.pod)
    assert sidecar_rules.installed_rules(lab.pod) == {}
    assert "ISTIO" not in lab.pod.run(["iptables-save"]).stdout


def test_sidecar_captures_app_but_not_proxy(lab: PodAndPeer) -> None:
    sidecar_rules.install(lab.pod, "mark")
    outbound = podsockets.listen_in_netns(lab.pod_fd, sidecar_rules.OUTBOUND_PORT)
    inbound = podsockets.listen_in_netns(lab.pod_fd, sidecar_rules.INBOUND_PORT)
    peer_app = podsockets.listen_in_netns(lab.peer_fd, APP_PORT, mark=None)
    opened = [outbound, inbound, peer_app]
    try:
        opened.append(_connect(lab.pod_fd, (PEER_IP, APP_PORT), mark=None))
        captured = _accept(outbound)
        opened.append(captured)
        assert podsockets.original_dst(captured) == (PEER_IP, APP_PORT)

        opened.append(_connect(lab.pod_fd, (PEER_IP, APP_PORT), mark=podsockets.INPOD_MARK))
        opened.append(_accept(peer_app))

        opened.append(_connect(lab.peer_fd, (POD_IP, 80), mark=None))
        inbound_conn = _accept(inbound)
        opened.append(inbound_conn)
        assert podsockets.original_dst(inbound_conn) == (POD_IP, 80)
    finally:
        for sock in opened:
            sock.close()
