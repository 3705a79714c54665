"""Sockets created from a netns fd live in that namespace, never in the caller's."""

from __future__ import annotations

import os
import socket
import struct
import uuid
from collections.abc import Iterator

import pytest

from testbed.mesh import podsockets
from testbed.netlab import nsutil
from testbed.netlab.netns import Netns


@pytest.fixture
def pod() -> Iterator[tuple[Netns, int]]:
    name = f"tbt-psock-{uuid.uuid4().hex[:6]}"
    nsutil.create_netns(name)
    fd = os.open(nsutil.netns_path(name), os.O_RDONLY)
    try:
        netns = Netns(name)
        netns.run(["ip", "link", "set", "lo", "up"])
        yield netns, fd
    finally:
        os.close(fd)
        nsutil.delete_netns(name)


def _my_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


def test_listener_lives_in_the_pod_netns(pod: tuple[Netns, int]) -> None:
    netns, fd = pod
    before = _my_netns()
    listener = podsockets.listen_in_netns(fd, 0, transparent=True)
    try:
        port = listener.getsockname()[1]
        assert _my_netns() == before  # the calling thread never moved
        in_pod = netns.run(["ss", "-Hltn", f"sport = :{port}"]).stdout
        assert f":{port}" in in_pod
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == podsockets.INPOD_MARK
        assert listener.getsockopt(socket.SOL_IP, podsockets.IP_TRANSPARENT) == 1

        # reachable from inside the pod, refused on the caller's own loopback
        client = podsockets.socket_in_netns(fd, mark=None)
        client.settimeout(3)
        client.connect(("127.0.0.1", port))
        accepted, peer = listener.accept()
        assert peer == client.getsockname()
        for sock in (client, accepted):
            sock.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=3).close()
    finally:
        listener.close()


def test_socket_options_and_bind(pod: tuple[Netns, int]) -> None:
    _, fd = pod
    sock = podsockets.socket_in_netns(
        fd, transparent=True, freebind=True, bind=("192.0.2.44", 0)
    )  # a foreign source address, as ztunnel's inbound leg uses
    try:
        assert sock.getsockname()[0] == "192.0.2.44"
        assert sock.getsockopt(socket.SOL_IP, podsockets.IP_FREEBIND) == 1
    finally:
        sock.close()


def test_errors_come_back_to_the_caller(pod: tuple[Netns, int]) -> None:
    _, fd = pod
    with pytest.raises(OSError):
        podsockets.socket_in_netns(fd, bind=("192.0.2.44", 0))  # not local, no freebind
    with pytest.raises(OSError):
        podsockets.call_in_netns(-1, lambda: None)


def test_call_in_netns_runs_inside() -> None:
    root_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        seen = podsockets.call_in_netns(root_fd, _my_netns)
    finally:
        os.close(root_fd)
    assert seen == os.readlink("/proc/self/ns/net")


def test_parse_sockaddr_in() -> None:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H4s", 8080, bytes([10, 1, 2, 3]))
    assert podsockets.parse_sockaddr_in(raw + bytes(8)) == ("10.1.2.3", 8080)
