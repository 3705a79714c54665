"""iperf3, sockperf, the rr workload, ping and the resource sampler for real: on 127.0.0.1
through a LocalHost that runs commands directly (loopback traffic only), and once between
two namespaces of a netlab Lab, whose Netns is the Host the testbed really uses."""

from __future__ import annotations

import secrets
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from localhost import LocalHost

from testbed.measure.host import Host
from testbed.measure.iperf import run_throughput
from testbed.measure.ping import run_ping
from testbed.measure.resources import ResourceSampler
from testbed.measure.rows import Measurement
from testbed.measure.rr import run_crr, run_rr
from testbed.measure.servers import wait_listening
from testbed.measure.sockperf import run_pingpong
from testbed.netlab import Lab

LOOPBACK = "127.0.0.1"


@pytest.fixture
def host() -> Iterator[LocalHost]:
    local = LocalHost()
    try:
        yield local
        # The run_* functions must have stopped every server they started.
        assert [p.label for p in local.spawned if p.poll() is None] == []
    finally:
        local.close()


@pytest.fixture
def port() -> int:
    """A TCP port free on loopback just now (the OS picks it, so parallel runs don't clash)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def by_metric(rows: list[Measurement]) -> dict[str, Measurement]:
    return {row.metric: row for row in rows}


def assert_latency_ladder(rows: dict[str, Measurement], prefix: str) -> None:
    """Positive, in microseconds, below a second, and ordered min <= p50 <= p99 <= max."""
    names = ["min", "p50", "p90", "p99", "max"]
    values = [rows[f"{prefix}_{name}"].value for name in names]
    assert all(rows[f"{prefix}_{name}"].unit == "us" for name in names)
    assert values[0] > 0
    assert values[-1] < 1_000_000
    assert values == sorted(values)
    assert rows[f"{prefix}_samples"].value > 100


def test_iperf3_throughput(host: LocalHost, port: int, tmp_path: Path) -> None:
    rows = by_metric(run_throughput(host, host, LOOPBACK, duration=1, port=port, raw_dir=tmp_path))
    assert rows["throughput"].unit == "bit/s"
    assert rows["throughput"].value > 1e8  # loopback does tens of Gbit/s; 100 Mbit/s is a floor
    assert rows["retransmits"].value >= 0
    assert 0 < rows["cpu_client"].value <= 200 and rows["cpu_client"].unit == "percent"
    assert 0 < rows["cpu_server"].value <= 200
    assert '"sum_received"' in (tmp_path / "iperf3-client.json").read_text()
    assert '"sum_received"' in (tmp_path / "iperf3-server.json").read_text()


def test_iperf3_reverse_with_two_streams(host: LocalHost, port: int) -> None:
    rows = by_metric(
        run_throughput(host, host, LOOPBACK, duration=1, port=port, parallel=2, reverse=True)
    )
    assert rows["throughput"].value > 1e8


def test_sockperf_round_trips(host: LocalHost, port: int) -> None:
    rows = by_metric(run_pingpong(host, host, LOOPBACK, duration=1, port=port))
    assert_latency_ladder(rows, "rtt")
    assert rows["rtt_p99.9"].value >= rows["rtt_p99"].value
    assert rows["request_rate"].value > 100 and rows["request_rate"].unit == "req/s"


@pytest.mark.parametrize("size", [64, 65536])
def test_sockperf_takes_64_b_to_64_kib(host: LocalHost, port: int, size: int) -> None:
    # sockperf's server drops messages over 65507 bytes unless told its maximum
    rows = by_metric(run_pingpong(host, host, LOOPBACK, duration=1, msg_size=size, port=port))
    assert rows["rtt_samples"].value > 10


def test_sockperf_server_binds_over_a_time_wait_on_its_port(host: LocalHost, port: int) -> None:
    # The server side closing first leaves its end in TIME-WAIT, as a proxy in front of the
    # server can after a case; the next case's server must still bind the port.
    with socket.create_server((LOOPBACK, port)) as listener:
        client = socket.create_connection((LOOPBACK, port))
        accepted, _ = listener.accept()
        accepted.close()
        client.recv(1)
        client.close()
    rows = by_metric(run_pingpong(host, host, LOOPBACK, duration=1, port=port))
    assert rows["rtt_samples"].value > 10


def test_rr_round_trips(host: LocalHost, port: int, tmp_path: Path) -> None:
    rows = by_metric(run_rr(host, host, LOOPBACK, duration=1, port=port, raw_dir=tmp_path))
    assert_latency_ladder(rows, "rtt")
    assert rows["request_rate"].value > 100
    assert (tmp_path / "rr-client.json").exists()


def test_rr_large_messages(host: LocalHost, port: int) -> None:
    rows = by_metric(run_rr(host, host, LOOPBACK, duration=1, size=256 * 1024, port=port))
    assert_latency_ladder(rows, "rtt")


def test_crr_connection_rate(host: LocalHost, port: int) -> None:
    rows = by_metric(run_crr(host, host, LOOPBACK, duration=1, port=port))
    assert rows["connect_rate"].value > 100 and rows["connect_rate"].unit == "conn/s"
    assert rows["errors"].value == 0
    for prefix in ("connect", "rtt", "transaction"):
        assert_latency_ladder(rows, prefix)
    assert rows["transaction_p50"].value >= rows["connect_p50"].value


def test_ping_loopback(host: LocalHost) -> None:
    rows = by_metric(run_ping(host, LOOPBACK, count=3, interval=0.2))
    assert rows["packet_loss"].value == 0.0
    assert rows["rtt_samples"].value == 3
    assert 0 < rows["rtt_min"].value <= rows["rtt_mean"].value <= rows["rtt_max"].value
    assert rows["rtt_mean"].unit == "us"


def test_sampler_sees_the_rr_server_work(host: LocalHost, port: int) -> None:
    workload = [sys.executable, "-m", "testbed.workloads.rr"]
    server = host.spawn([*workload, "server", "--port", str(port)], label="rr-server")
    wait_listening(host, server, port)
    client = [*workload, "client", "--host", LOOPBACK, "--port", str(port), "--duration", "1"]
    with ResourceSampler({"rr-server": server.pid}, interval=0.05) as sampler:
        host.run(client, timeout=30)
    server.terminate()
    rows = by_metric(sampler.measurements())
    assert rows["cpu_seconds"].value > 0.1  # it answered requests for a second
    assert 5.0 < rows["cpu_percent"].value <= 110.0
    assert rows["rss_max_bytes"].value > 1_000_000
    assert all(row.labels == {"process": "rr-server"} for row in rows.values())


@pytest.fixture
def two_namespaces() -> Iterator[tuple[Host, Host]]:
    """Namespaces a (10.250.0.1) and b (10.250.0.2) joined by a veth pair."""
    lab = Lab.create(f"tbtm{secrets.token_hex(3)}")
    try:
        a, b = lab.add_netns("a"), lab.add_netns("b")
        a.run(["ip", "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b.name])
        for ns, device, address in ((a, "va", "10.250.0.1/24"), (b, "vb", "10.250.0.2/24")):
            ns.run(["ip", "link", "set", "lo", "up"])
            ns.run(["ip", "addr", "add", address, "dev", device])
            ns.run(["ip", "link", "set", device, "up"])
        yield a, b
        assert [p.label for p in lab.processes if p.poll() is None] == []
    finally:
        assert lab.teardown().errors == []


def test_every_tool_across_namespaces(two_namespaces: tuple[Host, Host]) -> None:
    a, b = two_namespaces
    assert by_metric(run_ping(a, "10.250.0.2", count=2))["packet_loss"].value == 0.0
    assert by_metric(run_throughput(a, b, "10.250.0.2", duration=1))["throughput"].value > 1e8
    assert_latency_ladder(by_metric(run_pingpong(a, b, "10.250.0.2", duration=1)), "rtt")
    assert_latency_ladder(by_metric(run_rr(a, b, "10.250.0.2", duration=1)), "rtt")
    assert by_metric(run_crr(a, b, "10.250.0.2", duration=1))["connect_rate"].value > 100
