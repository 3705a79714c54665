"""http_echo and http_load: pure logic, and both as processes on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from localhost import LocalHost

from testbed.measure.errors import MeasureError
from testbed.measure.http import parse_http_load_json, run_http_fixed_qps
from testbed.measure.rows import Measurement
from testbed.workloads.http_echo import H2_PREFACE, Request, build_reply
from testbed.workloads.http_load import (
    ResponseError,
    ResponseParser,
    Schedule,
    build_request,
    histogram,
    summarize,
)

FIXTURES = Path(__file__).parent / "fixtures"

# ---------------------------------------------------------------- pure logic


def test_latency_summary_on_known_samples() -> None:
    summary = summarize(array("q", range(1000, 0, -1)))  # 1..1000 in reverse: must sort
    assert (summary["p50"], summary["p90"], summary["p99"], summary["p99.9"]) == (
        500,
        900,
        990,
        999,
    )
    assert (summary["min"], summary["max"], summary["mean"], summary["count"]) == (
        1,
        1000,
        500.5,
        1000,
    )
    assert summarize([7])["p99.9"] == 7
    assert summarize([])["count"] == 0


def test_histogram_buckets_are_1_2_5_and_inclusive() -> None:
    assert histogram([1, 2, 3, 5, 6, 10, 11, 999, 1000, 1001]) == [
        [1, 1],
        [2, 1],
        [5, 2],
        [10, 2],
        [20, 1],
        [1000, 2],
        [2000, 1],
    ]


def _request(target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> Request:
    return Request(b"POST", target, headers, body, "HTTP/1.1")


def test_reply_controls_from_query_override_headers() -> None:
    reply = build_reply(_request(b"/x?size=7&status=503", [(b"X-Size", b"3")]), "pod-a")
    assert (reply.status, reply.body, reply.delay_s) == (503, b"xxxxxxx", 0.0)
    assert (b"x-served-by", b"pod-a") in reply.headers
    assert (b"x-echo-x-size", b"3") in reply.headers
    delayed = build_reply(_request(b"/x", [(b"x-delay-ms", b"250")], b"hello"), "pod-a")
    assert (delayed.delay_s, delayed.body) == (0.25, b"hello")  # no size: the body is echoed


@pytest.mark.parametrize("query", [b"size=-1", b"status=99", b"delay_ms=abc", b"status=600"])
def test_reply_rejects_bad_controls(query: bytes) -> None:
    assert build_reply(_request(b"/x?" + query, []), "p").status == 400


def test_reply_json_describes_the_request() -> None:
    reply = build_reply(_request(b"/a/b?format=json", [(b"x-k", b"v")], b"abc"), "pod-b")
    described = json.loads(reply.body)
    assert described["served_by"] == "pod-b"
    assert (described["path"], described["headers"], described["body_bytes"]) == (
        "/a/b",
        {"x-k": "v"},
        3,
    )


def test_response_parser_frames_split_and_pipelined_responses() -> None:
    stream = (
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
        b"HTTP/1.1 503 \r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n"
        b"trailer: t\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"
    )
    parser = ResponseParser()
    statuses = [status for i in range(len(stream)) for status in parser.feed(stream[i : i + 1])]
    assert statuses == [200, 503, 204]
    assert parser.close_after and not parser.buffer
    assert ResponseParser().feed(stream) == [200, 503, 204]


@pytest.mark.parametrize(
    "garbage",
    [b"SSH-2.0-x\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n", b"HTTP/1.1 200\r\ncontent-length: x\r\n\r\n"],
)
def test_response_parser_rejects_garbage(garbage: bytes) -> None:
    with pytest.raises(ResponseError):
        ResponseParser().feed(garbage)


def test_request_is_prebuilt_with_length() -> None:
    request = build_request("POST", "/p?q=1", "10.0.0.1:8080", b"ab")
    assert request.startswith(b"POST /p?q=1 HTTP/1.1\r\nhost: 10.0.0.1:8080\r\n")
    assert b"content-length: 2\r\n" in request and request.endswith(b"\r\n\r\nab")


# ---------------------------------------------------------------- processes on loopback


class EchoServer:
    """An http_echo process on 127.0.0.1 and a free port."""

    def __init__(self, name: str) -> None:
        argv = [sys.executable, "-m", "testbed.workloads.http_echo"]
        argv += ["--bind", "127.0.0.1", "--port", "0", "--name", name]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # "http_echo listening on 127.0.0.1:PORT as NAME"
        assert "listening on" in line, line
        self.port = int(line.split()[3].rsplit(":", 1)[1])

    def url(self, path: str = "/echo") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=5)


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    server = EchoServer("pod-echo")
    yield server
    server.stop()


def _get(port: int, target: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", target, headers=headers or {})
    return conn.getresponse()


def test_echo_size_status_headers_and_served_by(echo: EchoServer) -> None:
    response = _get(echo.port, "/x?size=1500&status=503", {"X-Trace": "t-1"})
    assert response.status == 503
    assert len(response.read()) == 1500
    assert response.getheader("x-served-by") == "pod-echo"
    assert response.getheader("x-echo-x-trace") == "t-1"
    health = _get(echo.port, "/healthz")
    assert (health.status, health.read()) == (200, b"ok\n")


def test_echo_json_and_keep_alive(echo: EchoServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", echo.port, timeout=5)
    conn.request("POST", "/j", body=b"12345", headers={"Accept": "application/json"})
    described = json.loads(conn.getresponse().read())
    first_socket = conn.sock
    conn.request("GET", "/j?size=3")
    assert conn.getresponse().read() == b"xxx"
    assert conn.sock is first_socket  # the same connection carried both
    assert (described["served_by"], described["body_bytes"]) == ("pod-echo", 5)
    assert described["headers"]["accept"] == "application/json"


def test_echo_delay(echo: EchoServer) -> None:
    started = time.monotonic()
    assert _get(echo.port, "/x?delay_ms=200").status == 200
    assert 0.19 <= time.monotonic() - started < 2.0


def _h2_get(port: int, path: str) -> tuple[dict[bytes, bytes], bytes]:
    """One request over HTTP/2 prior knowledge with the h2 library as the client."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        headers = [(b":method", b"GET"), (b":path", path.encode()), (b":scheme", b"http")]
        headers += [(b":authority", b"echo"), (b"x-trace", b"h2")]
        conn.send_headers(1, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
        response_headers: dict[bytes, bytes] = {}
        body = b""
        while True:
            data = sock.recv(65536)
            assert data, "server closed before the stream ended"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    response_headers = dict(event.headers or [])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data or b""
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    return response_headers, body
            sock.sendall(conn.data_to_send())


def test_echo_http2_prior_knowledge(echo: EchoServer) -> None:
    headers, body = _h2_get(echo.port, "/x?size=100000&status=201")
    assert headers[b":status"] == b"201"
    assert len(body) == 100000  # larger than the initial 64 KiB window: flow control works
    assert headers[b"x-served-by"] == b"pod-echo"
    assert headers[b"x-echo-x-trace"] == b"h2"


def test_echo_status_line_has_the_standard_reason_and_date_server_headers(
    echo: EchoServer,
) -> None:
    raw = _raw_exchange(
        echo.port, b"GET /x?status=503 HTTP/1.1\r\nhost: e\r\nconnection: close\r\n\r\n"
    )
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert head[0] == b"HTTP/1.1 503 Service Unavailable"
    fields = dict(line.split(b": ", 1) for line in head[1:])
    assert fields[b"server"] == b"testbed-http-echo"
    assert fields[b"date"].endswith(b" GMT")  # IMF-fixdate
    headers, _ = _h2_get(echo.port, "/x")
    assert headers[b"server"] == b"testbed-http-echo" and b"date" in headers


@pytest.mark.parametrize("h1", [True, False], ids=["http1.1", "h2c"])
def test_h2load_counts_no_failed_requests(echo: EchoServer, h1: bool) -> None:
    """nghttp2's h2load, an independent client, accepts every reply over HTTP/1.1 and h2c."""
    if shutil.which("h2load") is None:
        pytest.skip("h2load (Debian package nghttp2-client) is not installed")
    argv = ["h2load", "-n", "200", "-c", "4", "-m", "4", echo.url("/x?size=1024")]
    result = subprocess.run(argv + (["--h1"] if h1 else []), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "200 total, 200 started, 200 done, 200 succeeded, 0 failed, 0 errored" in result.stdout
    assert "200 2xx" in result.stdout


def _raw_exchange(port: int, data: bytes) -> bytes:
    """Send bytes, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_echo_malformed_request_gets_400_and_server_survives(echo: EchoServer) -> None:
    assert _raw_exchange(echo.port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert _raw_exchange(echo.port, b"GET / HTTP/1.1\r\nno-colon\r\n\r\n").startswith(
        b"HTTP/1.1 400"
    )
    # HTTP/2 preface, then DATA on a stream never opened: GOAWAY(PROTOCOL_ERROR) and close.
    data_on_idle_stream = b"\x00\x00\x01\x00\x00\x00\x00\x00\x01x"
    assert _raw_exchange(echo.port, H2_PREFACE + data_on_idle_stream).endswith(b"\x00\x00\x00\x01")
    assert _get(echo.port, "/healthz").status == 200


def test_echo_oversized_headers_get_431(echo: EchoServer) -> None:
    request = b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 20000 + b"\r\n\r\n"
    assert _raw_exchange(echo.port, request).startswith(b"HTTP/1.1 431")
    assert _get(echo.port, "/healthz").status == 200


def _load(*args: str, timeout: float = 30) -> dict[str, Any]:
    argv = [sys.executable, "-m", "testbed.workloads.http_load", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_load_achieves_target_rate(echo: EchoServer) -> None:
    report = _load("--url", echo.url(), "--qps", "200", "--connections", "4", "--duration", "2")
    latency = report["latency_us"]
    # The window ends with the last response: a late tail stretches it (shown if this fails).
    assert report["achieved_qps"] == pytest.approx(200, rel=0.05), (report["window_s"], latency)
    assert report["responses"] == 400
    assert report["error_count"] == 0
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]


def test_load_http2_counts_status_errors(echo: EchoServer) -> None:
    url = echo.url("/x?status=503")
    report = _load("--url", url, "--qps", "100", "--connections", "2", "--duration", "1", "--http2")
    assert report["protocol"] == "h2"
    assert report["errors"] == {"status_503": report["responses"]}
    assert report["responses"] == 100


@pytest.mark.parametrize("protocol", [[], ["--http2"]])
def test_load_records_timeouts(echo: EchoServer, protocol: list[str]) -> None:
    slow = echo.url("/x?delay_ms=400")
    report = _load("--url", slow, "--qps", "20", "--connections", "1", "--duration", "0.5",
                   "--timeout", "0.1", *protocol)  # fmt: skip
    # Every request times out, and only that: for h2 just the stream is reset.
    assert report["errors"] == {"timeout": 10}
    assert report["responses"] == 0


def test_load_records_connect_errors() -> None:
    with socket.socket() as unused:  # a port that nobody listens on
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    report = _load("--url", f"http://127.0.0.1:{closed_port}/", "--qps", "50", "--duration", "0.5")
    assert report["errors"].get("connect", 0) >= 1
    assert report["responses"] == 0


def test_load_charges_a_server_stall_to_the_requests_it_delayed() -> None:
    """Coordinated omission: the server stops for 500 ms mid-run (SIGSTOP); with one connection
    the requests due during the stall could not be sent, and each must be charged its wait."""
    server = EchoServer("pod-stall")
    try:

        def stall() -> None:
            time.sleep(1.0)
            os.kill(server.process.pid, signal.SIGSTOP)
            time.sleep(0.5)
            os.kill(server.process.pid, signal.SIGCONT)

        staller = threading.Thread(target=stall)
        staller.start()
        report = _load("--url", server.url(), "--qps", "200", "--connections", "1",
                       "--duration", "3", "--raw")  # fmt: skip
        staller.join()
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        server.stop()
    latencies_ms = [us / 1000 for us in report["raw_latencies_us"]]
    assert report["error_count"] == 0
    assert report["latency_us"]["p99"] >= 300_000
    # ~100 requests fell due during the stall, waiting 500 ms down to 0: most must show it.
    assert sum(1 for ms in latencies_ms if ms >= 100) >= 50
    # Charging by due time means the rate is kept: the backlog is sent when the server is back.
    assert report["responses"] == 600


# ---------------------------------------------------------------- measure.http


def _rows_by_metric(rows: list[Measurement]) -> dict[str, tuple[float, str]]:
    return {row.metric: (row.value, row.unit) for row in rows}


def test_parse_http_load_report() -> None:
    rows = parse_http_load_json((FIXTURES / "http_load_report.json").read_text())
    values = _rows_by_metric(rows)
    assert values["http_p50"] == (0.593, "ms")
    assert values["http_p999"] == (8.062, "ms")
    assert values["http_mean"] == pytest.approx((1.131728, "ms"))
    assert values["achieved_qps"] == (500.0, "req/s")
    assert (values["errors"], values["requests"]) == ((5.0, "count"), (502.0, "count"))
    assert {row.labels["protocol"] for row in rows} == {"http/1.1"}


def test_parse_report_without_responses_has_no_latency_rows() -> None:
    report = json.loads((FIXTURES / "http_load_report.json").read_text().splitlines()[-1])
    report.update(latency_us={"count": 0}, responses=0, achieved_qps=0.0)
    values = _rows_by_metric(parse_http_load_json(json.dumps(report)))
    assert set(values) == {"achieved_qps", "errors", "requests"}


@pytest.mark.parametrize("text", ["", "not json", '{"protocol": "h2"}', "[1, 2]"])
def test_parse_bad_reports_raise(text: str) -> None:
    with pytest.raises(MeasureError):
        parse_http_load_json(text)


@pytest.mark.parametrize("http2", [False, True])
def test_run_http_fixed_qps_on_loopback(http2: bool, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    host = LocalHost(name="pod-local")
    rows = run_http_fixed_qps(
        host, host, "127.0.0.1", qps=100, connections=2, duration=1, warmup=0.3, port=port,
        http2=http2, raw_dir=tmp_path,
    )  # fmt: skip
    values = _rows_by_metric(rows)
    assert values["achieved_qps"][0] == pytest.approx(100, rel=0.1)  # plumbing, not precision
    assert values["errors"] == (0.0, "count")
    assert 0 < values["http_p50"][0] <= values["http_p99"][0] <= values["http_max"][0]
    assert values["http_p50"][1] == "ms"
    assert [p.poll() for p in host.spawned] != [None]  # the echo server was stopped
    assert "--name" in host.spawned[0].popen.args  # type: ignore[operator]
    assert json.loads((tmp_path / "http-load.json").read_text())["responses"] == 100


def test_schedule_counts_requests_exactly() -> None:
    schedule = Schedule(qps=100, warmup=0.3, duration=1.0, t0=1000.0)
    claims = list(iter(schedule.claim, None))
    assert len(claims) == 130
    assert [recorded for _, recorded in claims].count(True) == 100
    assert claims[30] == pytest.approx((1000.3, True)) and claims[29][1] is False
    assert claims[1][0] - claims[0][0] == pytest.approx(0.01)


def test_load_with_a_new_connection_per_request(echo: EchoServer) -> None:
    report = _load("--url", echo.url(), "--qps", "100", "--connections", "2", "--duration", "1",
                   "--new-connection")  # fmt: skip
    assert report["new_connection"] is True
    assert report["responses"] == 100 and report["error_count"] == 0
    connect = report["connect_latency_us"]
    assert connect["count"] == 100  # one connect per request
    assert 0 < connect["p50"] <= report["latency_us"]["p50"]  # the latency includes it


def test_new_connection_is_http1_only() -> None:
    argv = [sys.executable, "-m", "testbed.workloads.http_load", "--url", "http://127.0.0.1:1/",
            "--http2", "--new-connection"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "HTTP/1.1 only" in done.stderr
