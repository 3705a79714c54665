"""The run_* functions against a scripted Host: what they spawn and run, in which order,
and that the server is always stopped."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from testbed.measure.errors import MeasureError
from testbed.measure.iperf import run_throughput
from testbed.measure.ping import run_ping
from testbed.measure.rows import Measurement
from testbed.measure.rr import run_crr, run_rr
from testbed.measure.servers import wait_listening
from testbed.measure.sockperf import run_pingpong

FIXTURES = Path(__file__).parent / "fixtures"
LISTEN_LINE = "LISTEN 0 128 0.0.0.0:5201 0.0.0.0:*\n"


class FakeProcess:
    def __init__(self, argv: Sequence[str], *, exit_code: int | None, output: str) -> None:
        self.argv = list(argv)
        self.pid = 4242
        self.exit_code = exit_code
        self.text = output
        self.terminated = False

    def poll(self) -> int | None:
        return self.exit_code

    def wait(self, timeout: float | None = None) -> int:
        return 0 if self.exit_code is None else self.exit_code

    def terminate(self, timeout: float = 5.0) -> int | None:
        self.terminated = True
        return self.exit_code

    def output(self) -> str:
        return self.text


class FakeHost:
    """Answers `ss` with "listening" from the `listen_after`-th call on, any other command
    with `client_stdout`; spawns FakeProcesses."""

    def __init__(
        self,
        client_stdout: str = "",
        *,
        listen_after: int = 1,
        server_exit: int | None = None,
        client_hangs: bool = False,
    ) -> None:
        self.client_stdout = client_stdout
        self.listen_after = listen_after
        self.server_exit = server_exit
        self.client_hangs = client_hangs
        self.ran: list[list[str]] = []
        self.spawned: list[FakeProcess] = []

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = 60.0,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        self.ran.append(list(argv))
        if argv[0] == "ss":
            polls = sum(1 for command in self.ran if command[0] == "ss")
            listening = LISTEN_LINE if polls >= self.listen_after else ""
            return subprocess.CompletedProcess(list(argv), 0, listening, "")
        if self.client_hangs:
            raise subprocess.TimeoutExpired(list(argv), timeout or 0.0)
        return subprocess.CompletedProcess(list(argv), 0, self.client_stdout, "")

    def spawn(
        self,
        argv: Sequence[str],
        *,
        label: str,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> FakeProcess:
        process = FakeProcess(argv, exit_code=self.server_exit, output='{"server": true}')
        self.spawned.append(process)
        return process

    def clients(self) -> list[list[str]]:
        return [argv for argv in self.ran if argv[0] != "ss"]


def metrics(rows: Sequence[Measurement]) -> set[str]:
    return {row.metric for row in rows}


def test_throughput_waits_for_the_server_then_runs_the_client(tmp_path: Path) -> None:
    host = FakeHost((FIXTURES / "iperf3_p2.json").read_text(), listen_after=3)
    rows = run_throughput(host, host, "10.1.0.2", duration=2, parallel=2, raw_dir=tmp_path)
    assert metrics(rows) == {"throughput", "retransmits", "cpu_client", "cpu_server"}
    (server,) = host.spawned
    assert server.argv == ["iperf3", "-s", "-1", "-J", "-p", "5201"]
    assert server.terminated
    assert [argv[0] for argv in host.ran] == ["ss", "ss", "ss", "iperf3"]
    assert host.clients() == [
        ["iperf3", "-c", "10.1.0.2", "-p", "5201", "-J", "-t", "2", "-P", "2"]
    ]
    assert (tmp_path / "iperf3-client.json").read_text() == host.client_stdout
    assert (tmp_path / "iperf3-server.json").read_text() == '{"server": true}'


def test_throughput_error_still_stops_the_server() -> None:
    host = FakeHost((FIXTURES / "iperf3_refused.json").read_text())
    with pytest.raises(MeasureError, match="Connection refused"):
        run_throughput(host, host, "10.1.0.2", duration=1)
    assert host.spawned[0].terminated


def test_server_that_exits_before_listening_fails_without_running_the_client() -> None:
    host = FakeHost(listen_after=1000, server_exit=1)
    with pytest.raises(MeasureError, match="exited with 1 before listening"):
        run_throughput(host, host, "10.1.0.2", duration=1)
    assert host.clients() == []
    assert host.spawned[0].terminated


def test_server_that_never_listens_times_out() -> None:
    host = FakeHost(listen_after=1000)
    server = host.spawn(["server"], label="server")
    with pytest.raises(MeasureError, match="nothing listens on port 80"):
        wait_listening(host, server, 80, timeout=0.05)


def test_hanging_client_is_a_measure_error() -> None:
    host = FakeHost(client_hangs=True)
    with pytest.raises(MeasureError, match="still running"):
        run_throughput(host, host, "10.1.0.2", duration=1)
    assert host.spawned[0].terminated


def test_pingpong_asks_sockperf_for_full_round_trips(tmp_path: Path) -> None:
    host = FakeHost((FIXTURES / "sockperf_pp_tcp_fullrtt.txt").read_text())
    rows = run_pingpong(host, host, "10.1.0.2", duration=2, msg_size=100, raw_dir=tmp_path)
    assert {"rtt_p50", "rtt_p99.9", "rtt_samples", "request_rate"} <= metrics(rows)
    assert host.spawned[0].argv == [
        "sockperf", "server", "--tcp", "-i", "0.0.0.0", "-p", "11111", "--uc-reuseaddr",
    ]  # fmt: skip
    assert host.clients() == [
        ["sockperf", "ping-pong", "--tcp", "-i", "10.1.0.2", "-p", "11111",
         "-t", "2", "-m", "100", "--full-rtt"],
    ]  # fmt: skip
    assert host.spawned[0].terminated
    assert (tmp_path / "sockperf-client.txt").exists()


def test_pingpong_of_64_kib_tells_the_server_its_size() -> None:
    host = FakeHost((FIXTURES / "sockperf_pp_tcp_fullrtt.txt").read_text())
    run_pingpong(host, host, "10.1.0.2", duration=1, msg_size=65536)
    assert host.spawned[0].argv[-2:] == ["-m", "65536"]
    assert host.clients()[0][-3:] == ["-m", "65536", "--full-rtt"]


def test_udp_pingpong_waits_for_a_udp_socket() -> None:
    host = FakeHost((FIXTURES / "sockperf_pp_tcp_fullrtt.txt").read_text())
    run_pingpong(host, host, "10.1.0.2", duration=1, tcp=False)
    assert ["ss", "-H", "-lun", "sport", "=", ":11111"] in host.ran
    assert "--tcp" not in host.clients()[0]


def test_rr_runs_the_project_workload() -> None:
    host = FakeHost((FIXTURES / "rr_client.json").read_text())
    rows = run_rr(host, host, "10.1.0.2", duration=1.5, size=128, port=7000)
    assert {"rtt_p50", "rtt_p99.9", "rtt_mean", "request_rate"} <= metrics(rows)
    workload = [sys.executable, "-m", "testbed.workloads.rr"]
    assert host.spawned[0].argv == [*workload, "server", "--port", "7000"]
    assert host.clients() == [
        [*workload, "client", "--host", "10.1.0.2", "--port", "7000",
         "--size", "128", "--duration", "1.5"],
    ]  # fmt: skip


def test_crr_asks_for_a_new_connection_per_request() -> None:
    host = FakeHost((FIXTURES / "crr_client.json").read_text())
    rows = run_crr(host, host, "10.1.0.2", duration=1)
    assert {"connect_rate", "connect_p50", "transaction_p99"} <= metrics(rows)
    assert "--new-connection" in host.clients()[0]


def test_rr_client_error_is_raised() -> None:
    host = FakeHost((FIXTURES / "rr_refused.json").read_text())
    with pytest.raises(MeasureError, match="Connection refused"):
        run_rr(host, host, "10.1.0.2", duration=1)
    assert host.spawned[0].terminated


def test_ping_argv_and_rows() -> None:
    host = FakeHost((FIXTURES / "ping_loss.txt").read_text())
    rows = run_ping(host, "10.1.0.9", count=4, interval=0.5)
    assert host.clients() == [["ping", "-n", "-c", "4", "-i", "0.5", "-W", "1", "10.1.0.9"]]
    assert {row.metric: row.value for row in rows}["packet_loss"] == 50.0
