"""Through two real ztunnels (mode inpod, cross-node): the receiving app stops reading for
2 s mid-transfer; the transfer stalls, resumes and completes with the right sha256."""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

from podapps import GreetingServer, connect, finish, read_line

from testbed.cluster.cluster import Cluster
from testbed.cluster.loader import load_topology
from testbed.redirect import create_mode
from testbed.redirect.inpod import http_get

PORT = 9300
BLOCK = bytes(range(256)) * 4096  # 1 MiB
MEGABYTES = 96
PAUSE = 2.0


class PausingServer(GreetingServer):
    """Reads 4 MiB, then nothing for PAUSE seconds, then the rest; answers the sha256."""

    paused_at = 0.0

    def answer(self, conn: socket.socket) -> None:
        digest, got = hashlib.sha256(), 0
        while got < 4 << 20 and (chunk := conn.recv(min(1 << 20, (4 << 20) - got))):
            digest.update(chunk)
            got += len(chunk)
        PausingServer.paused_at = time.monotonic()
        time.sleep(PAUSE)
        while chunk := conn.recv(1 << 20):
            digest.update(chunk)
        conn.sendall(digest.hexdigest().encode())


def received_by_ztunnel(cluster: Cluster, node: str, workload: str) -> float:
    pod = cluster.mode.nodes[node].pod  # type: ignore[attr-defined]
    metrics = http_get(pod, 15020, "/metrics")[1].decode()
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("istio_tcp_received_bytes_total{") and all(
            f'{k}="{v}"' in line
            for k, v in {"reporter": "destination", "destination_workload": workload}.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_2s_app_stall_mid_transfer_resumes_and_completes(runs_root: Path) -> None:
    cluster = Cluster(
        load_topology("two_nodes"), create_mode("inpod"), name="hbpause", root=runs_root
    )
    try:
        cluster.start()
        client, server = cluster.pods["client"], cluster.pods["server2"]
        app = PausingServer(server, PORT)
        sent = hashlib.sha256()
        with connect(client, server.ip, PORT, timeout=60) as sock:
            assert read_line(sock).startswith("server2 ")
            for _ in range(MEGABYTES):
                sock.sendall(BLOCK)
                sent.update(BLOCK)
            done_sending = time.monotonic()
            answer = finish(sock)
        app.close()
        assert answer == sent.hexdigest()
        # the pipe cannot hold 92 MiB: the sender was held back until the app read again
        assert done_sending - PausingServer.paused_at >= PAUSE * 0.9
        deadline = time.monotonic() + 5
        while (carried := received_by_ztunnel(cluster, "node2", "server2")) < MEGABYTES << 20:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert carried >= MEGABYTES << 20  # it went through the inbound ztunnel
    finally:
        cluster.stop()
