"""The rr workload's wire protocol on socket pairs, and the parser of its report."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.measure.errors import MeasureError
from testbed.measure.rr import parse_rr_json
from testbed.workloads import rr

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair on 127.0.0.1: (client side, server side)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        left = socket.create_connection(listener.getsockname())
        right, _ = listener.accept()
    try:
        yield left, right
    finally:
        left.close()
        right.close()


def test_recv_exact_joins_partial_reads(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    buffer = bytearray(6)
    left.sendall(b"abc")
    sender = threading.Timer(0.05, left.sendall, args=(b"def",))
    sender.start()
    assert rr.recv_exact(right, memoryview(buffer), 6)
    sender.join()
    assert buffer == b"abcdef"


def test_recv_exact_reports_a_clean_end(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    left.shutdown(socket.SHUT_WR)
    assert not rr.recv_exact(right, memoryview(bytearray(4)), 4)


def test_recv_exact_refuses_a_cut_message(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    left.sendall(b"ab")
    left.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionError, match="2 of 4 bytes"):
        rr.recv_exact(right, memoryview(bytearray(4)), 4)


def test_ping_pong_against_the_echo_loop(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    echo = threading.Thread(target=rr._echo_until_closed, args=(server, 32))
    echo.start()
    samples = rr.ping_pong(client, 32, time.perf_counter_ns() + 50_000_000)
    client.shutdown(socket.SHUT_WR)
    echo.join(timeout=5)
    assert not echo.is_alive()  # the echo loop ends on the client's close
    assert len(samples) > 10
    assert all(sample > 0 for sample in samples)


def test_one_shot_connection_is_answered_and_closed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    client.sendall(rr.HEADER.pack(5, rr.ONE_SHOT) + b"hello")
    rr._accept_one(server)
    assert client.recv(16) == b"hello"
    assert client.recv(16) == b""  # the server closed first
    assert server.fileno() == -1


def test_oversized_message_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    client.sendall(rr.HEADER.pack(rr.MAX_SIZE + 1, 0))
    with pytest.raises(ValueError, match="out of range"):
        rr._accept_one(server)


def test_client_rejects_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert rr.main(["client", "--host", "127.0.0.1", "--port", "1", "--size", "0"]) == 2
    assert "--size" in capsys.readouterr().out


def values(name: str) -> dict[str, tuple[float, str, str]]:
    rows = parse_rr_json((FIXTURES / name).read_text())
    return {row.metric: (row.value, row.unit, row.labels["tool"]) for row in rows}


def test_rr_report() -> None:
    got = values("rr_client.json")
    assert got["rtt_p50"] == (21.12, "us", "rr")
    assert got["rtt_p99.9"] == (719.009, "us", "rr")
    assert got["rtt_samples"] == (35272.0, "count", "rr")
    assert got["request_rate"] == pytest.approx((35271.39717655086, "req/s", "rr"))
    assert "connect_rate" not in got


def test_crr_report() -> None:
    got = values("crr_client.json")
    assert got["connect_rate"] == pytest.approx((5794.923773572683, "conn/s", "crr"))
    assert got["errors"] == (0.0, "count", "crr")
    assert got["connect_p50"] == (63.82, "us", "crr")
    assert got["rtt_p90"] == (99.637, "us", "crr")
    assert got["transaction_p99.9"] == (450.394, "us", "crr")
    assert got["transaction_samples"] == (5795.0, "count", "crr")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ((FIXTURES / "rr_refused.json").read_text(), "Connection refused"),
        ("Traceback (most recent call last):\n", "no JSON report"),
        ('{"mode": "rr", "rtt_us": {}}', "malformed"),
    ],
)
def test_bad_reports_raise(text: str, message: str) -> None:
    with pytest.raises(MeasureError, match=message):
        parse_rr_json(text)
