from pathlib import Path

import pytest

from testbed.measure.errors import MeasureError
from testbed.measure.iperf import client_argv, parse_iperf3_json

FIXTURES = Path(__file__).parent / "fixtures"


def values(text: str) -> dict[str, tuple[float, str]]:
    return {row.metric: (row.value, row.unit) for row in parse_iperf3_json(text)}


def test_two_streams_report() -> None:
    got = values((FIXTURES / "iperf3_p2.json").read_text())
    assert got == {
        "throughput": (pytest.approx(29854256285.108116), "bit/s"),
        "retransmits": (0.0, "count"),
        "cpu_client": (pytest.approx(91.28209421078436), "percent"),
        "cpu_server": (pytest.approx(71.82097719843665), "percent"),
    }


def test_reverse_report_uses_what_the_receiver_got() -> None:
    got = values((FIXTURES / "iperf3_reverse.json").read_text())
    assert got["throughput"] == pytest.approx((9256991769.321, "bit/s"))
    assert got["cpu_server"][0] == pytest.approx(99.84093928799587)


def test_rows_carry_the_tool_label() -> None:
    rows = parse_iperf3_json((FIXTURES / "iperf3_p2.json").read_text())
    assert all(row.labels == {"tool": "iperf3"} for row in rows)


def test_error_report_raises_with_iperf3_message() -> None:
    # iperf3 3.12 exits 0 here: the error field is the only sign of failure.
    with pytest.raises(MeasureError, match="unable to connect to server: Connection refused"):
        parse_iperf3_json((FIXTURES / "iperf3_refused.json").read_text())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not JSON"),
        ("iperf3: error - unable to connect", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"end": {"sum_sent": {}}}', "lacks"),
    ],
)
def test_malformed_reports_raise(text: str, message: str) -> None:
    with pytest.raises(MeasureError, match=message):
        parse_iperf3_json(text)


def test_client_argv() -> None:
    argv = client_argv("10.0.0.2", duration=2, parallel=4, port=5202, reverse=True, extra=("-Z",))
    assert argv == [
        "iperf3", "-c", "10.0.0.2", "-p", "5202", "-J", "-t", "2", "-P", "4", "-R", "-Z",
    ]  # fmt: skip
