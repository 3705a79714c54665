"""testbed.chaos.verdict and the rig's leak arithmetic: judging a fault from flows' operations."""

from __future__ import annotations

import errno

from testbed.chaos.rig import fd_growth
from testbed.chaos.traffic import Op, Outcome, classify
from testbed.chaos.verdict import FAIL_SECONDS, FaultVerdict, Summary, judge, record_recovery

FAULT_AT, REPAIRED_AT = 100.0, 103.0


def op(flow: str, started: float, ended: float, outcome: Outcome = "ok") -> Op:
    return Op(flow, started, ended, outcome, "" if outcome == "ok" else "ConnectionResetError")


def steady(flow: str, start: float = 90.0, end: float = 110.0) -> list[Op]:
    """Back-to-back 1 s operations, all ok."""
    return [op(flow, t, t + 1.0) for t in range(int(start), int(end))]


def verdict_for(ops: dict[str, list[Op]], affected: set[str], unaffected: set[str]) -> FaultVerdict:
    return judge("f", ops, FAULT_AT, REPAIRED_AT, affected=affected, unaffected=unaffected)


def test_a_clean_fault_passes_and_counts_the_affected_failures() -> None:
    cut = [op("a", 99.5, 100.2, "reset"), op("a", 100.3, 100.4, "reset"), *steady("a", 104)]
    verdict = verdict_for({"a": cut, "b": steady("b")}, {"a"}, {"b"})
    assert verdict.ok, verdict.problems
    assert verdict.failed_ops == {"a": 2}
    assert verdict.in_flight_end == {"a": 0.2}


def test_an_unaffected_flow_that_fails_is_a_problem() -> None:
    broken = [*steady("b", 90, 101), op("b", 101.0, 101.5, "reset"), *steady("b", 102)]
    verdict = verdict_for({"b": broken}, set(), {"b"})
    assert not verdict.ok
    assert "off the fault's path" in verdict.problems[0]


def test_corruption_and_hangs_are_problems_on_any_flow() -> None:
    ops = {"a": [op("a", 100.5, 101.0, "corrupt")], "c": [op("c", 99.0, 109.0, "hang")]}
    verdict = verdict_for(ops, {"a"}, set())  # c: neither affected nor unaffected
    assert [p.split(":")[1].split()[0] for p in verdict.problems] == ["corrupt", "hang"]


def test_an_in_flight_operation_failing_late_breaks_the_bound() -> None:
    late = [op("a", 99.0, FAULT_AT + FAIL_SECONDS + 1, "reset")]
    assert "took" in verdict_for({"a": late}, {"a"}, set()).problems[0]
    slow_but_ok = [op("a", 99.0, FAULT_AT + FAIL_SECONDS + 1)]  # stalled, then delivered
    assert verdict_for({"a": slow_but_ok}, {"a"}, set()).ok


def test_operations_outside_the_window_do_not_count() -> None:
    ops = {"b": [op("b", 80.0, 81.0, "reset"), op("b", 105.0, 106.0, "reset")]}
    assert verdict_for(ops, set(), {"b"}).ok


def test_no_recovery_is_a_problem() -> None:
    verdict = verdict_for({}, set(), set())
    record_recovery(verdict, "a", 0.4)
    record_recovery(verdict, "b", None)
    assert verdict.recovery == {"a": 0.4, "b": None}
    assert verdict.problems == ["b: no new connection worked within 5.0 s of the repair"]


def test_summary_totals() -> None:
    summary = Summary("inpod")
    summary.add_ops([op("a", 0, 1), op("a", 1, 2, "reset"), op("a", 2, 3, "corrupt")])
    verdict = verdict_for({}, set(), set())
    record_recovery(verdict, "a", 1.5)
    summary.add_fault("kill-ztunnel", verdict)
    summary.add_leaks(["ztunnel-node1: 40 open descriptors, baseline 20 (+12 allowed)"])
    assert (summary.connections_checked, summary.corrupted, summary.clean_failures) == (3, 1, 1)
    assert summary.faults == {"kill-ztunnel": 1} and summary.worst_recovery_seconds == 1.5
    assert summary.leaks_found == 1 and not summary.ok
    assert summary.as_json()["ok"] is False
    assert "corrupted 1, hangs 0" in "\n".join(summary.lines())
    assert Summary("legacy").ok


def test_fd_growth_allows_the_tolerance_and_ignores_a_gone_proxy() -> None:
    baseline = {"ztunnel-node1": 20, "ztunnel-node2": 20, "waypoint": 30}
    now = {"ztunnel-node1": 32, "ztunnel-node2": 33}
    assert fd_growth(baseline, now, 12) == [
        "ztunnel-node2: 33 open descriptors, baseline 20 (+12 allowed)"
    ]


def test_a_timeout_is_a_hang_and_a_reset_is_clean() -> None:
    assert classify(TimeoutError()) == "hang"
    assert classify(ConnectionResetError()) == "reset"
    assert classify(ConnectionRefusedError()) == "reset"
    assert classify(OSError(errno.EHOSTUNREACH, "unreachable")) == "reset"
