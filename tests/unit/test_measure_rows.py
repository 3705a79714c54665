from pathlib import Path

import pytest

from testbed.measure.raw import save_raw
from testbed.measure.rows import Measurement, Summary, nearest_rank, percentile_name, with_labels


def test_nearest_rank_picks_a_sample_at_or_above_the_percentile() -> None:
    ordered = [float(v) for v in range(1, 1001)]  # 1..1000
    assert nearest_rank(ordered, 50) == 500
    assert nearest_rank(ordered, 99) == 990
    assert nearest_rank(ordered, 99.9) == 999  # not 1000: float rounding is absorbed
    assert nearest_rank(ordered, 100) == 1000
    assert nearest_rank(ordered, 0) == 1


def test_nearest_rank_on_few_samples_rounds_the_rank_up() -> None:
    assert nearest_rank([10.0, 20.0, 30.0], 50) == 20.0
    assert nearest_rank([10.0, 20.0, 30.0], 34) == 20.0
    assert nearest_rank([10.0, 20.0, 30.0], 33) == 10.0
    assert nearest_rank([7.0], 99.9) == 7.0


def test_nearest_rank_refuses_no_samples() -> None:
    with pytest.raises(ValueError):
        nearest_rank([], 50)


def test_percentile_names() -> None:
    assert [percentile_name(p) for p in (50, 99.0, 99.9, 99.99)] == [
        "p50",
        "p99",
        "p99.9",
        "p99.99",
    ]


def test_summary_of_unsorted_samples() -> None:
    summary = Summary.from_samples([4.0, 1.0, 3.0, 2.0])
    assert (summary.count, summary.min, summary.max, summary.mean) == (4, 1.0, 4.0, 2.5)
    assert summary.percentiles == {"p50": 2.0, "p90": 4.0, "p99": 4.0, "p99.9": 4.0}


def test_summary_dict_round_trip() -> None:
    summary = Summary.from_samples([1.5, 2.5, 9.0], percentiles=(50, 75))
    flat = summary.to_dict()
    assert flat == {"count": 3, "mean": 13.0 / 3, "min": 1.5, "max": 9.0, "p50": 2.5, "p75": 9.0}
    assert Summary.from_dict(flat) == summary


def test_summary_rows_are_named_after_the_prefix() -> None:
    rows = Summary.from_samples([1.0, 2.0]).measurements("rtt", "us", {"mode": "none"})
    by_metric = {row.metric: row for row in rows}
    assert set(by_metric) == {
        "rtt_mean",
        "rtt_min",
        "rtt_max",
        "rtt_p50",
        "rtt_p90",
        "rtt_p99",
        "rtt_p99.9",
        "rtt_samples",
    }
    assert by_metric["rtt_p50"] == Measurement("rtt_p50", 1.0, "us", {"mode": "none"})
    assert by_metric["rtt_samples"].unit == "count"
    assert by_metric["rtt_samples"].value == 2.0


def test_with_labels_adds_and_overrides_without_touching_the_originals() -> None:
    original = Measurement("throughput", 1e9, "bit/s", {"tool": "iperf3", "rep": "0"})
    (labelled,) = with_labels([original], {"rep": "1", "mode": "ambient"})
    assert labelled.labels == {"tool": "iperf3", "rep": "1", "mode": "ambient"}
    assert original.labels == {"tool": "iperf3", "rep": "0"}


def test_rows_do_not_share_label_dicts() -> None:
    shared = {"tool": "iperf3"}
    first = Measurement("throughput", 1.0, "bit/s", shared)
    second = Measurement("retransmits", 0.0, "count", shared)
    first.labels["rep"] = "1"
    assert shared == {"tool": "iperf3"}
    assert second.labels == {"tool": "iperf3"}


def test_as_row_is_flat() -> None:
    row = Measurement("retransmits", 3.0, "count", {"tool": "iperf3"}).as_row()
    assert row == {"tool": "iperf3", "metric": "retransmits", "value": 3.0, "unit": "count"}


def test_save_raw_never_overwrites(tmp_path: Path) -> None:
    first = save_raw(tmp_path / "raw", "iperf3-client.json", "one")
    second = save_raw(tmp_path / "raw", "iperf3-client.json", "two")
    assert first == tmp_path / "raw" / "iperf3-client.json"
    assert second == tmp_path / "raw" / "iperf3-client-2.json"
    assert (first.read_text(), second.read_text()) == ("one", "two")
    assert save_raw(None, "x.json", "three") is None
