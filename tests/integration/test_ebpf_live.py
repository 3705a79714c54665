"""The ebpf datapath in real namespaces, without ztunnel: one node, three pods and a
"ztunnel" namespace whose listeners are plain IP_TRANSPARENT sockets made by the test.

Checks that bpf_redirect + bpf_sk_assign deliver an enrolled pod's connection to the 15001
listener with the original destination as the local address, that spoofed-source upstream
connections from the ztunnel namespace work both ways, that a pod that is not enrolled is
not redirected, that map entries and tc filters follow enroll/unenroll, that teardown
leaves nothing, and that a program the verifier rejects leaves nothing attached.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.mesh import podsockets
from testbed.netlab import Lab, Netns, links
from testbed.redirect import bpfload
from testbed.redirect.ebpf_node import POD_DEV, Hook, NodeDatapath

GATEWAY = "10.66.0.1"
PODS = {"a": "10.66.0.2", "b": "10.66.0.3", "c": "10.66.0.4"}
ZTUNNEL_IP = "10.66.0.9"
APP_PORT = 8080
TIMEOUT = 3.0
HOOKS: list[Hook] = ["tc", "tcx"]


@dataclass
class MiniNode:
    lab: Lab
    node: Netns
    pods: dict[str, Netns]
    ztunnel: Netns
    bpffs: Path

    def fd(self, ns: Netns) -> int:
        return os.open(ns.path, os.O_RDONLY)


def _add_pod(lab: Lab, node: Netns, name: str, ip: str) -> Netns:
    ns = lab.add_netns(name)
    host_dev = f"vp{name}"
    with node.iproute() as ipr:
        index = links.add_veth(ipr, host_dev, ns, POD_DEV)
        links.add_address(ipr, index, GATEWAY, 32)
        links.set_up(ipr, index)
        links.add_route(ipr, f"{ip}/32", oif=index, link_scope=True)
    with ns.iproute() as ipr:
        links.loopback_up(ipr)
        eth0 = links.ifindex(ipr, POD_DEV)
        links.add_address(ipr, eth0, ip, 32)
        links.set_up(ipr, eth0)
        links.add_route(ipr, f"{GATEWAY}/32", oif=eth0, link_scope=True)
        links.add_route(ipr, "0.0.0.0/0", gateway=GATEWAY, oif=eth0)
    return ns


@pytest.fixture
def mini(runs_root: Path) -> Iterator[MiniNode]:
    lab = Lab.create("ebpf", runs_root)
    try:
        node = lab.add_netns("node")
        with node.iproute() as ipr:
            links.loopback_up(ipr)
        node.set_sysctl("net.ipv4.ip_forward", 1)
        pods = {name: _add_pod(lab, node, name, ip) for name, ip in PODS.items()}
        ztunnel = _add_pod(lab, node, "z", ZTUNNEL_IP)
        yield MiniNode(lab, node, pods, ztunnel, bpfload.mount_bpffs(lab))
    finally:
        lab.teardown()


def _datapath(mini: MiniNode, hook: Hook = "tc") -> NodeDatapath:
    return NodeDatapath.install(
        mini.lab,
        mini.bpffs,
        "node",
        node=mini.node,
        ztunnel=mini.ztunnel,
        ztunnel_host_dev="vpz",
        ztunnel_ip=ZTUNNEL_IP,
        host_ip=GATEWAY,
        hook=hook,
    )


def _listen(ns: Netns, port: int, *, transparent: bool) -> socket.socket:
    fd = os.open(ns.path, os.O_RDONLY)
    try:
        sock = podsockets.listen_in_netns(fd, port, transparent=transparent, mark=None)
    finally:
        os.close(fd)
    sock.settimeout(TIMEOUT)
    return sock


def _connect(ns: Netns, dest: tuple[str, int], source: str | None = None) -> socket.socket:
    fd = os.open(ns.path, os.O_RDONLY)
    try:
        bind = (source, 0) if source else None
        sock = podsockets.socket_in_netns(fd, mark=None, transparent=bool(source), bind=bind)
    finally:
        os.close(fd)
    sock.settimeout(TIMEOUT)
    sock.connect(dest)
    return sock


def _exchange(client: socket.socket, server: socket.socket) -> None:
    """A request and a reply cross the connection: both directions work."""
    client.sendall(b"ping")
    assert server.recv(4) == b"ping"
    server.sendall(b"pong")
    assert client.recv(4) == b"pong"


@pytest.mark.parametrize("hook", HOOKS)
def test_outbound_reaches_ztunnel_with_original_destination(mini: MiniNode, hook: Hook) -> None:
    datapath = _datapath(mini, hook)
    datapath.enroll(PODS["a"], mini.pods["a"], "vpa")
    outbound = _listen(mini.ztunnel, 15001, transparent=True)
    app = _listen(mini.pods["b"], APP_PORT, transparent=False)
    with outbound, app, _connect(mini.pods["a"], (PODS["b"], APP_PORT)) as client:
        accepted, peer = outbound.accept()
        with accepted:
            assert accepted.getsockname() == (PODS["b"], APP_PORT)
            assert peer == client.getsockname()
            _exchange(client, accepted)


def test_spoofed_upstream_to_enrolled_pod_and_back(mini: MiniNode) -> None:
    """ztunnel's inbound leg: a plaintext client hits 15006, ztunnel connects to the app
    with the client's address (spoofed), and the app's replies come back to ztunnel."""
    datapath = _datapath(mini)
    datapath.enroll(PODS["b"], mini.pods["b"], "vpb")
    inbound = _listen(mini.ztunnel, 15006, transparent=True)
    app = _listen(mini.pods["b"], APP_PORT, transparent=False)
    with inbound, app, _connect(mini.pods["c"], (PODS["b"], APP_PORT)) as client:
        captured, peer = inbound.accept()
        assert captured.getsockname() == (PODS["b"], APP_PORT)
        assert peer == client.getsockname()
        with captured, _connect(mini.ztunnel, (PODS["b"], APP_PORT), source=PODS["c"]) as up:
            served, app_peer = app.accept()
            with served:
                assert app_peer[0] == PODS["c"]  # the app sees the real client
                _exchange(up, served)
                _exchange(client, captured)


def test_not_enrolled_pod_is_not_redirected(mini: MiniNode) -> None:
    datapath = _datapath(mini)
    datapath.enroll(PODS["a"], mini.pods["a"], "vpa")
    outbound = _listen(mini.ztunnel, 15001, transparent=True)
    app = _listen(mini.pods["b"], APP_PORT, transparent=False)
    with outbound, app, _connect(mini.pods["c"], (PODS["b"], APP_PORT)) as client:
        served, peer = app.accept()
        with served:
            assert peer == client.getsockname()
            _exchange(client, served)
        outbound.setblocking(False)
        with pytest.raises(BlockingIOError):
            outbound.accept()


@pytest.mark.parametrize("hook", HOOKS)
def test_enroll_and_unenroll_follow_maps_and_filters(mini: MiniNode, hook: Hook) -> None:
    datapath = _datapath(mini, hook)
    assert bpfload.attached_programs(mini.node, "vpz", "ingress") == ["ztunnel_host_ingress"]
    assert bpfload.attached_programs(mini.ztunnel, POD_DEV, "ingress") == ["ztunnel_tproxy"]
    datapath.enroll(PODS["a"], mini.pods["a"], "vpa")
    [entry] = datapath.enrolled()
    assert entry.ip == PODS["a"]
    assert bpfload.attached_programs(mini.node, "vpa", "ingress") == ["app_outbound"]
    assert bpfload.attached_programs(mini.node, "vpa", "egress") == ["app_inbound"]
    datapath.unenroll(PODS["a"], "vpa")
    assert datapath.enrolled() == []
    assert bpfload.attached_programs(mini.node, "vpa", "ingress") == []
    assert bpfload.attached_programs(mini.node, "vpa", "egress") == []
    app = _listen(mini.pods["b"], APP_PORT, transparent=False)
    with app, _connect(mini.pods["a"], (PODS["b"], APP_PORT)):
        app.accept()[0].close()  # straight to the app again


def _wait_unloaded(ids: set[int], timeout: float = 10.0) -> set[int]:
    """Program ids still loaded after `timeout` (a deleted namespace frees its devices,
    and with them the tc filters holding programs, in a kernel worker, a bit later)."""
    deadline = time.monotonic() + timeout
    while (left := ids & bpfload.loaded_program_ids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_teardown_removes_pins_mount_and_programs(runs_root: Path) -> None:
    lab = Lab.create("ebpf-td", runs_root)
    node = lab.add_netns("node")
    ztunnel = _add_pod(lab, node, "z", ZTUNNEL_IP)
    bpffs = bpfload.mount_bpffs(lab)
    datapath = NodeDatapath.install(
        lab, bpffs, "node", node=node, ztunnel=ztunnel, ztunnel_host_dev="vpz",
        ztunnel_ip=ZTUNNEL_IP, host_ip=GATEWAY,
    )  # fmt: skip
    assert datapath.loaded.program("ztunnel_tproxy").exists()
    ids = {bpfload.program_id(datapath.loaded.program(p)) for p in bpfload.PROGRAMS}
    assert ids <= bpfload.loaded_program_ids() and len(ids) == 4
    report = lab.teardown()
    assert report.errors == []
    assert not os.path.ismount(bpffs) and not bpffs.exists()
    assert _wait_unloaded(ids) == set()


BROKEN_PROGRAM = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
SEC("tc")
int app_outbound(struct __sk_buff *skb)
{
	/* reads packet data without a bounds check: the verifier must refuse this */
	return *(__u8 *)(long)skb->data;
}
char LICENSE[] SEC("license") = "GPL";
"""


def test_rejected_program_gives_clear_error_and_attaches_nothing(
    mini: MiniNode, tmp_path: Path
) -> None:
    source = tmp_path / "broken.bpf.c"
    source.write_text(BROKEN_PROGRAM)
    obj = tmp_path / "broken.bpf.o"
    subprocess.run(
        ["clang", "-O2", "-g", "-target", "bpf", f"-I{bpfload.BPF_DIR}", "-c", str(source),
         "-o", str(obj)],
        check=True,
    )  # fmt: skip
    with pytest.raises(bpfload.BpfLoadError, match="verifier") as failure:
        NodeDatapath.install(
            mini.lab, mini.bpffs, "node", node=mini.node, ztunnel=mini.ztunnel,
            ztunnel_host_dev="vpz", ztunnel_ip=ZTUNNEL_IP, host_ip=GATEWAY, obj=obj,
        )  # fmt: skip
    assert "invalid access to packet" in str(failure.value)  # the verifier's own words
    assert not (mini.bpffs / "node").exists()
    assert bpfload.attached_programs(mini.node, "vpz", "ingress") == []
    assert bpfload.attached_programs(mini.ztunnel, POD_DEV, "ingress") == []


# ------------------------------------------------------------ fail modes and UDP

UDP_PORT = 9999


def _counter_rule(ns: Netns, match: list[str]) -> None:
    """A rule that only counts: mangle PREROUTING sees every packet the tc programs let in."""
    ns.run(["iptables", "-w", "-t", "mangle", "-A", "PREROUTING", *match])


def _counted(ns: Netns) -> int:
    """Packets counted by the first rule of mangle PREROUTING."""
    done = ns.run(["iptables", "-w", "-t", "mangle", "-L", "PREROUTING", "-v", "-n", "-x"])
    return int(done.stdout.splitlines()[2].split()[0])


def _try_connect(ns: Netns, dest: tuple[str, int]) -> bool:
    try:
        _connect(ns, dest).close()
    except OSError:
        return False
    return True


def test_tproxy_passes_what_no_listener_matches(mini: MiniNode) -> None:
    """ztunnel is not listening: ztunnel_tproxy lets the SYN go on to the namespace's stack
    (netfilter counts it) instead of dropping it in tc, as Istio's program does."""
    datapath = _datapath(mini)
    datapath.enroll(PODS["a"], mini.pods["a"], "vpa")
    _counter_rule(mini.ztunnel, ["-p", "tcp", "--dport", str(APP_PORT)])
    app = _listen(mini.pods["b"], APP_PORT, transparent=False)
    with app:
        assert not _try_connect(mini.pods["a"], (PODS["b"], APP_PORT))
    assert _counted(mini.ztunnel) >= 1


def test_no_ztunnel_attached_drops_the_pods_traffic(mini: MiniNode) -> None:
    datapath = _datapath(mini)
    datapath.enroll(PODS["a"], mini.pods["a"], "vpa")
    datapath.enroll(PODS["b"], mini.pods["b"], "vpb")
    _counter_rule(mini.ztunnel, ["-p", "tcp", "--dport", str(APP_PORT)])
    outbound = _listen(mini.ztunnel, 15001, transparent=True)
    app = _listen(mini.pods["b"], APP_PORT, transparent=False)
    with outbound, app:
        datapath.detach_ztunnel()
        assert not _try_connect(mini.pods["a"], (PODS["b"], APP_PORT))  # app_outbound drops
        assert not _try_connect(mini.pods["c"], (PODS["b"], APP_PORT))  # app_inbound drops
        assert _counted(mini.ztunnel) == 0  # dropped in tc: neither ztunnel nor the app saw it
        app.setblocking(False)
        with pytest.raises(BlockingIOError):
            app.accept()
        datapath.attach_ztunnel()
        with _connect(mini.pods["a"], (PODS["b"], APP_PORT)) as client:
            accepted, _ = outbound.accept()
            with accepted:
                assert accepted.getsockname() == (PODS["b"], APP_PORT)
                _exchange(client, accepted)


def _udp_socket(ns: Netns, port: int = 0) -> socket.socket:
    fd = os.open(ns.path, os.O_RDONLY)
    try:
        sock = podsockets.call_in_netns(
            fd, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        )
    finally:
        os.close(fd)
    sock.bind(("0.0.0.0", port))
    sock.settimeout(TIMEOUT)
    return sock


def test_udp_of_an_enrolled_pod_goes_through_ztunnels_namespace(mini: MiniNode) -> None:
    """Steered to ztunnel's veth like TCP (netfilter there counts it), then routed on to its
    destination, and the answer comes back the same way."""
    datapath = _datapath(mini)
    datapath.enroll(PODS["a"], mini.pods["a"], "vpa")
    _counter_rule(mini.ztunnel, ["-p", "udp"])
    with _udp_socket(mini.pods["a"]) as sender, _udp_socket(mini.pods["b"], UDP_PORT) as peer:
        sender.sendto(b"datagram", (PODS["b"], UDP_PORT))
        data, source = peer.recvfrom(64)
        assert (data, source[0]) == (b"datagram", PODS["a"])
        peer.sendto(b"answer", source)
        assert sender.recvfrom(64) == (b"answer", (PODS["b"], UDP_PORT))
    assert _counted(mini.ztunnel) == 2  # the datagram and its answer
