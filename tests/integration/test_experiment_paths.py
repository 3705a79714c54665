"""The experiment's data paths on a real inpod cluster (root): what the underlay carries.

The client sends a marker over TCP to the server pod on the other node while an AF_PACKET
socket in the server's node reads every frame on its underlay link (eth0):

- capture (server unenrolled): the client's ztunnel passes the TCP through without TLS, so
  the marker crosses the underlay in the clear, to the app's own port;
- hbone (both enrolled): the underlay carries only TCP to or from port 15008, never the
  marker (it is inside mTLS);
- waypoint: the same on a service VIP, through the waypoint pod.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from testbed.cluster.cluster import Cluster
from testbed.cluster.loader import load_topology
from testbed.experiment.paths import destination, set_path, waypoint_variant
from testbed.redirect import create_mode

APP_PORT = 7777
MARKER = b"TESTBED-PLAINTEXT-MARKER-0123456789"
ETH_P_ALL = 0x0003
HBONE_PORT = 15008


@dataclass
class Capture:
    """TCP segments seen on one interface: (source port, destination port, payload)."""

    segments: list[tuple[int, int, bytes]] = field(default_factory=list)

    def carried_marker(self) -> bool:
        return any(MARKER in payload for _, _, payload in self.segments)

    def ports(self) -> set[int]:
        """The well-known end of every segment (the lower of its two ports)."""
        return {min(source, target) for source, target, _ in self.segments}


def _tcp_segment(frame: bytes) -> tuple[int, int, bytes] | None:
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":  # IPv4 only, as the underlay is
        return None
    ip = frame[14:]
    header = (ip[0] & 0x0F) * 4
    if ip[9] != socket.IPPROTO_TCP:
        return None
    tcp = ip[header:]
    source, target = struct.unpack("!HH", tcp[:4])
    offset = (tcp[12] >> 4) * 4
    return source, target, bytes(tcp[offset:])


@contextmanager
def sniffing(netns: Any, interface: str) -> Iterator[Capture]:
    """Read every frame on `interface` of `netns` while the block runs."""
    with netns.entered():
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((interface, 0))
    sock.settimeout(0.1)
    capture, stop = Capture(), threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                frame = sock.recv(65535)
            except TimeoutError:
                continue
            segment = _tcp_segment(frame)
            if segment is not None:
                capture.segments.append(segment)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield capture
    finally:
        time.sleep(0.2)  # the last ACKs
        stop.set()
        reader.join()
        sock.close()


def exchange(client: Any, server: Any, target_ip: str) -> bytes:
    """Send MARKER from the client pod to an echo socket in the server pod; the echo."""
    with server.netns.entered():
        listener = socket.create_server(("0.0.0.0", APP_PORT))
    answer = b""

    def echo() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(conn.recv(4096))

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    try:
        with client.netns.entered():
            sock = socket.create_connection((target_ip, APP_PORT), timeout=5)
        with sock:
            sock.sendall(MARKER)
            while len(answer) < len(MARKER) and (chunk := sock.recv(4096)):
                answer += chunk
        thread.join(timeout=5)
    finally:
        listener.close()
    return answer


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(waypoint_variant(load_topology("two_nodes")), create_mode("inpod")) as built:
        yield built


def _measure(cluster: Cluster, path: str) -> Capture:
    client, server = cluster.pair("cross-node")
    set_path(cluster, path, [server])
    target = destination(cluster, path, server).ip
    with sniffing(cluster.nodes[server.node].netns, "eth0") as capture:
        assert exchange(client, server, target) == MARKER
    return capture


def test_capture_passes_plain_tcp_through_the_client_ztunnel(cluster: Cluster) -> None:
    capture = _measure(cluster, "capture")
    assert capture.carried_marker(), "the app's bytes should cross the underlay in the clear"
    assert APP_PORT in capture.ports() and HBONE_PORT not in capture.ports()


def test_hbone_carries_only_tls_on_15008(cluster: Cluster) -> None:
    capture = _measure(cluster, "hbone")
    assert capture.segments, "nothing crossed the underlay"
    assert not capture.carried_marker()
    assert capture.ports() == {HBONE_PORT}
    # a TLS record (content type 20-23, version 3.x) opens every data-carrying segment burst
    payloads = [p for _, _, p in capture.segments if p]
    assert payloads and payloads[0][0] in (20, 21, 22, 23) and payloads[0][1] == 3


def test_waypoint_path_goes_through_the_waypoint_over_hbone(cluster: Cluster) -> None:
    capture = _measure(cluster, "waypoint")
    assert not capture.carried_marker()
    assert capture.ports() == {HBONE_PORT}
    assert cluster.proxy_pids().get("waypoint-exp-waypoint")


def test_back_to_capture_after_the_waypoint(cluster: Cluster) -> None:
    assert _measure(cluster, "capture").carried_marker()
