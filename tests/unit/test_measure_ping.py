from pathlib import Path

import pytest

from testbed.measure.errors import MeasureError
from testbed.measure.ping import parse_ping

FIXTURES = Path(__file__).parent / "fixtures"


def values(name: str) -> dict[str, tuple[float, str]]:
    rows = parse_ping((FIXTURES / name).read_text())
    assert all(row.labels == {"tool": "ping"} for row in rows)
    return {row.metric: (row.value, row.unit) for row in rows}


def test_all_replies() -> None:
    assert values("ping_ok.txt") == {
        "packet_loss": (0.0, "percent"),
        "rtt_samples": (3.0, "count"),
        "rtt_min": (pytest.approx(40.0), "us"),
        "rtt_mean": (pytest.approx(61.0), "us"),
        "rtt_max": (pytest.approx(86.0), "us"),
        "rtt_mdev": (pytest.approx(19.0), "us"),
    }


def test_partial_loss() -> None:
    got = values("ping_loss.txt")
    assert got["packet_loss"] == (50.0, "percent")
    assert got["rtt_samples"] == (4.0, "count")
    assert got["rtt_max"] == pytest.approx((153.0, "us"))


def test_no_reply_is_full_loss_without_rtt_rows() -> None:
    assert values("ping_all_lost.txt") == {
        "packet_loss": (100.0, "percent"),
        "rtt_samples": (0.0, "count"),
    }


def test_unreachable_network_raises_with_ping_message() -> None:
    with pytest.raises(MeasureError, match="Network is unreachable"):
        parse_ping((FIXTURES / "ping_unreachable.txt").read_text())
