"""Through two real ztunnels (mode inpod, cross-node), with the HBONE timers shortened through
the proxies' environment: a pooled connection unused for the idle timeout is closed and the
next connection opens a fresh one; a destination ztunnel frozen with SIGSTOP (TCP still
acknowledged by its kernel, HTTP/2 silent) is detected by the source ztunnel's PING keepalive,
which resets the client's connection and says why in its log and connection record."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Iterator

import pytest
from conftest import TEST_RUNS
from podapps import EchoServer, connect, read_line

from testbed.cluster import Pod
from testbed.cluster.cluster import Cluster
from testbed.cluster.loader import load_topology
from testbed.mesh.hbone.timers import ENV_PING_INTERVAL, ENV_PING_TIMEOUT, ENV_POOL_IDLE_TIMEOUT
from testbed.netlab import clean_all
from testbed.netlab.process import signal_group
from testbed.redirect import create_mode
from testbed.redirect.base import http_get

IDLE_PORT, FREEZE_PORT = 9310, 9311  # a closed listener's port stays taken by its thread
PING_INTERVAL, PING_TIMEOUT, IDLE = 1.0, 3.0, 3.0
SLACK = 5.0  # a loaded 2-vCPU machine


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One testbed for the module (its own manifest root, as `runs_root` makes one)."""
    root = TEST_RUNS / uuid.uuid4().hex[:12]
    root.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as env:  # inherited by the proxy processes
        env.setenv(ENV_PING_INTERVAL, f"{PING_INTERVAL:g}s")
        env.setenv(ENV_PING_TIMEOUT, f"{PING_TIMEOUT:g}s")
        env.setenv(ENV_POOL_IDLE_TIMEOUT, f"{IDLE:g}s")
        built = Cluster(
            load_topology("two_nodes,apps=false"), create_mode("inpod"), name="hbkeep", root=root
        )
        try:
            built.start()
            yield built
        finally:
            built.stop()
            clean_all(root)
            shutil.rmtree(root, ignore_errors=True)


def hbone_ports(pod: Pod, server: Pod) -> set[int]:
    """Local ports of the established HBONE connections from `pod` to `server`'s 15008."""
    out = pod.netns.run(["ss", "-tnH", "state", "established", "dst", f"{server.ip}:15008"])
    return {int(line.split()[-2].rsplit(":", 1)[1]) for line in out.stdout.splitlines() if line}


def echo(sock: socket.socket) -> bytes:
    sock.sendall(b"ping")
    return sock.recv(16)


def test_an_unused_pooled_connection_is_released_and_the_next_opens_afresh(
    cluster: Cluster,
) -> None:
    client, server = cluster.pods["client"], cluster.pods["server2"]
    app = EchoServer(server, IDLE_PORT)
    try:
        with connect(client, server.ip, IDLE_PORT) as sock:
            assert read_line(sock).startswith("server2 ")
            assert echo(sock) == b"ping"
            first = hbone_ports(client, server)
            assert len(first) == 1
        deadline = time.monotonic() + IDLE + SLACK
        while hbone_ports(client, server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert hbone_ports(client, server) == set()  # released despite the keepalive PINGs
        with connect(client, server.ip, IDLE_PORT) as sock:
            assert read_line(sock).startswith("server2 ")
            second = hbone_ports(client, server)
        assert len(second) == 1 and second != first
    finally:
        app.close()


def test_a_frozen_destination_ztunnel_is_detected_and_the_client_reset(cluster: Cluster) -> None:
    client, server = cluster.pods["client"], cluster.pods["server2"]
    source = cluster.mode.ztunnels["node1"]  # type: ignore[attr-defined]
    frozen = cluster.mode.ztunnels["node2"]  # type: ignore[attr-defined]
    app = EchoServer(server, FREEZE_PORT)
    try:
        with connect(client, server.ip, FREEZE_PORT, timeout=60) as sock:
            assert read_line(sock).startswith("server2 ")
            assert echo(sock) == b"ping"
            signal_group(frozen.process.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                outcome = sock.recv(16)  # nothing comes until the source ztunnel gives up
            except ConnectionResetError:
                outcome = b"reset"
            waited = time.monotonic() - stopped
        assert outcome == b"reset"
        assert waited <= PING_INTERVAL + PING_TIMEOUT + SLACK
        why = f"no PING ACK within {PING_TIMEOUT:g} s"
        assert why in source.process.output()
        assert hbone_ports(client, server) == set()  # the pool dropped it
        records = json.loads(http_get(source.pod, 15000, "/connections")[1])["connections"]
        (record,) = [r for r in records if r["original_dst"] == f"{server.ip}:{FREEZE_PORT}"]
        assert record["verdict"] == "error" and why in record["reason"]
    finally:
        signal_group(frozen.process.pid, signal.SIGCONT)
        app.close()
