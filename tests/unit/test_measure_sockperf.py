from pathlib import Path

import pytest

from testbed.measure.errors import MeasureError
from testbed.measure.sockperf import parse_sockperf_pingpong

FIXTURES = Path(__file__).parent / "fixtures"


def values(name: str) -> dict[str, tuple[float, str]]:
    rows = parse_sockperf_pingpong((FIXTURES / name).read_text())
    assert all(row.labels == {"tool": "sockperf"} for row in rows)
    return {row.metric: (row.value, row.unit) for row in rows}


def test_full_rtt_report_gives_round_trip_rows() -> None:
    got = values("sockperf_pp_tcp_fullrtt.txt")
    assert got["rtt_mean"] == (27.187, "us")
    assert got["rtt_stddev"] == (15.356, "us")
    assert got["rtt_min"] == (17.132, "us")
    assert got["rtt_max"] == (1470.346, "us")
    assert got["rtt_p25"] == (22.482, "us")
    assert got["rtt_p50"] == (27.561, "us")
    assert got["rtt_p90"] == (32.029, "us")
    assert got["rtt_p99"] == (48.160, "us")
    assert got["rtt_p99.9"] == (82.183, "us")
    assert got["rtt_p99.99"] == (530.654, "us")
    assert got["rtt_p99.999"] == (1470.346, "us")
    assert got["rtt_samples"] == (20210.0, "count")
    assert got["request_rate"] == pytest.approx((20210 / 0.550, "req/s"))


def test_default_report_is_named_half_rtt() -> None:
    got = values("sockperf_pp_tcp.txt")
    assert not any(metric.startswith("rtt_") for metric in got)
    assert got["half_rtt_p50"] == (20.277, "us")
    assert got["half_rtt_mean"] == (20.496, "us")
    assert got["half_rtt_samples"] == (13405.0, "count")


def test_connection_refused_raises_with_sockperf_message() -> None:
    # sockperf 3.7 exits 0 here: only its ERROR line tells.
    with pytest.raises(MeasureError, match="Connection refused"):
        parse_sockperf_pingpong((FIXTURES / "sockperf_pp_refused.txt").read_text())


def test_output_without_statistics_raises() -> None:
    with pytest.raises(MeasureError, match="no sockperf ping-pong statistics"):
        parse_sockperf_pingpong("sockperf: == version #3.7-no.git ==\n")
