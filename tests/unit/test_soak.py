"""The soak's pure parts: the leak detector (testbed.soak.leak: flat series pass, growing
ones fail), the ss parsing of the sampler, the duration option and the summary."""

from __future__ import annotations

import random

import pytest

from testbed.soak.leak import THRESHOLDS, Threshold, fit_slope, judge, judge_rows, second_half
from testbed.soak.report import summarize
from testbed.soak.run import SoakError, SoakOptions, parse_duration
from testbed.soak.sample import hbone_connections_by_pid

FDS = THRESHOLDS["fds"]
TIMES = [5.0 * i for i in range(121)]  # 10 minutes, a sample every 5 s


def test_least_squares_slope_of_a_line_and_of_nothing() -> None:
    assert fit_slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert fit_slope([0, 1, 2], [4, 4, 4]) == 0.0
    assert fit_slope([7], [1]) == 0.0
    with pytest.raises(ValueError, match="3 times for 2 values"):
        fit_slope([0, 1, 2], [1, 2])


def test_only_the_second_half_is_fitted() -> None:
    times, values = second_half([0, 10, 20, 30, 40], [1, 2, 3, 4, 5])
    assert times == [20, 30, 40] and values == [3, 4, 5]


def test_a_flat_series_passes() -> None:
    verdict = judge("ztunnel-node1", "fds", TIMES, [42.0] * len(TIMES), FDS)
    assert not verdict.leaks
    assert verdict.slope_per_min == 0.0 and verdict.points == 61


def test_a_series_growing_three_fds_a_minute_fails() -> None:
    values = [40.0 + 3 * t / 60.0 for t in TIMES]
    verdict = judge("ztunnel-node1", "fds", TIMES, values, FDS)
    assert verdict.leaks
    assert verdict.slope_per_min == pytest.approx(3.0)
    assert verdict.rise == pytest.approx(15.0)  # over the 5 minutes of the second half
    assert "LEAK: ztunnel-node1 fds slope +3" in verdict.describe(FDS)


def test_both_the_slope_and_the_rise_must_pass_their_limit() -> None:
    values = [40.0 + t / 60.0 for t in TIMES]  # 1 fd/min: 5 fds over the 5-minute half
    strict = Threshold(max_slope=0.5, max_rise=4.0, unit="fds")
    assert judge("z", "fds", TIMES, values, strict).leaks
    lenient = Threshold(max_slope=0.5, max_rise=6.0, unit="fds")  # 5 fds is within it
    assert not judge("z", "fds", TIMES, values, lenient).leaks


def test_a_noisy_flat_series_passes() -> None:
    noise = random.Random(16)
    values = [50.0 + noise.uniform(-8, 8) for _ in TIMES]  # in-flight connections come and go
    assert not judge("waypoint", "fds", TIMES, values, FDS).leaks


def test_growth_that_stops_in_the_first_half_is_warm_up() -> None:
    values = [min(100.0, 20.0 + t) for t in TIMES]  # a pool filling for 80 s, then flat
    assert not judge("ztunnel-node2", "fds", TIMES, values, FDS).leaks


def test_a_steep_but_small_step_passes_and_a_long_steady_climb_fails() -> None:
    step = [30.0 if t < 400 else 36.0 for t in TIMES]  # six more fds once: bounded
    assert not judge("z", "fds", TIMES, step, FDS).leaks
    climb = [30.0 + 0.3 * i for i in range(len(TIMES))]  # 3.6 fds a minute, 36 over the run
    assert judge("z", "fds", TIMES, climb, FDS).leaks


def test_too_few_samples_give_no_verdict() -> None:
    assert not judge("z", "fds", [0, 5, 10], [1, 100, 1000], FDS).leaks


def test_rows_are_grouped_per_proxy_and_metric_with_their_own_thresholds() -> None:
    rows = [("a", "fds", t, 10.0) for t in TIMES]
    rows += [("b", "fds", t, 10.0 + t) for t in reversed(TIMES)]  # any order
    rows += [("a", "rss_bytes", t, 50e6 + 1000 * t) for t in TIMES]  # 60 KB/min: fine
    rows += [("a", "cpu_seconds", t, t) for t in TIMES]  # cumulative: not judged
    verdicts = {(v.proxy, v.metric): v.leaks for v in judge_rows(rows)}
    assert verdicts == {("a", "fds"): False, ("b", "fds"): True, ("a", "rss_bytes"): False}


def test_ss_lines_count_established_hbone_connections_per_process() -> None:
    output = (
        '0 0 10.0.1.2:40312 10.0.2.3:15008 users:(("python",pid=4242,fd=17))\n'
        '0 0 10.0.1.2:40318 10.0.2.3:15008 users:(("python",pid=4242,fd=18))\n'
        '0 0 10.0.1.4:51000 10.0.2.5:15008 users:(("python",pid=77,fd=9),("python",pid=78,fd=9))\n'
    )
    assert hbone_connections_by_pid(output) == {4242: 2, 77: 1, 78: 1}
    assert hbone_connections_by_pid("") == {}


@pytest.mark.parametrize(
    ("text", "seconds"), [("600", 600.0), ("90s", 90.0), ("10m", 600.0), ("1.5h", 5400.0)]
)
def test_durations_read_as_a_user_writes_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "-5m", "0", "10d"])
def test_a_bad_duration_is_one_error_naming_it(text: str) -> None:
    with pytest.raises(SoakError, match=f"--duration {text!r}: expected a positive number"):
        parse_duration(text)


def test_the_summary_names_each_leak_and_a_churn_shortfall() -> None:
    verdicts = [
        judge("ztunnel-node1", "fds", TIMES, [40.0 + t / 10 for t in TIMES], FDS),
        judge("waypoint", "fds", TIMES, [40.0] * len(TIMES), FDS),
    ]
    counts = {"connections_churned": 9000.0, "policy_changes": 20.0}
    text = summarize(SoakOptions(duration=600), verdicts, counts, {"http": "timed out"})
    assert "connections churned: 9000 (failed attempts" in text
    assert "0); FEWER than the 10000 asked for" in text
    assert "policy changes: 20" in text
    assert "http: 0 steps failed, the last: timed out" in text
    assert "ok: waypoint fds" in text
    assert text.endswith("leaks found: 1\nLEAK: ztunnel-node1 fds grows without bound")
