"""What a fault did to the flows, judged from their operations (pure; no sockets).

For one fault, between `injected` and `repaired` (plus SETTLE_SECONDS for what was in
flight), a flow is either:

- unaffected (its path avoids what the fault broke): every operation that overlaps the
  window is ok;
- affected: its operations may fail, but only cleanly (reset or EOF; never a hang, never
  corrupt bytes), and the one in flight when the fault hit ends within FAIL_SECONDS;
- neither (the fault may or may not touch it): only "never corrupt, never a hang".

Recovery (a new connection on every affected flow's path works within RECOVERY_SECONDS of
the repair returning) is measured by the caller with `traffic.first_success`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from testbed.chaos.traffic import Op

FAIL_SECONDS = 5.0  # an affected operation in flight at the fault ends (reset/EOF) by then
RECOVERY_SECONDS = 5.0  # after the repair returns (the proxy ready again), new connections work
SETTLE_SECONDS = 1.0  # operations still in flight this long after the repair belong to it


@dataclass
class FaultVerdict:
    fault: str
    injected: float
    repaired: float
    problems: list[str] = field(default_factory=list)
    failed_ops: dict[str, int] = field(default_factory=dict)  # affected flow -> failures
    in_flight_end: dict[str, float] = field(default_factory=dict)  # flow -> s after the fault
    recovery: dict[str, float | None] = field(default_factory=dict)  # flow -> s after repair

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def overlapping(ops: Iterable[Op], start: float, end: float) -> list[Op]:
    return [op for op in ops if op.ended >= start and op.started <= end]


def judge(
    fault: str,
    ops: Mapping[str, Sequence[Op]],
    injected: float,
    repaired: float,
    *,
    affected: Iterable[str],
    unaffected: Iterable[str],
) -> FaultVerdict:
    """The verdict on one fault from every flow's operations (by flow name)."""
    verdict = FaultVerdict(fault, injected, repaired)
    end = repaired + SETTLE_SECONDS
    affected, unaffected = set(affected), set(unaffected)
    for name, flow_ops in ops.items():
        window = overlapping(flow_ops, injected, end)
        for op in window:
            if op.outcome in ("corrupt", "hang"):
                verdict.problems.append(f"{name}: {op.outcome} ({op.detail or 'no detail'})")
        failed = [op for op in window if op.outcome != "ok"]
        if name in unaffected and failed:
            first = failed[0]
            verdict.problems.append(
                f"{name} is off the fault's path but {len(failed)} operation(s) failed, "
                f"first {first.started - injected:+.2f} s after it: {first.detail}"
            )
        if name in affected:
            verdict.failed_ops[name] = len(failed)
            hit = [op for op in window if op.started <= injected <= op.ended]
            if hit:
                took = hit[0].ended - injected
                verdict.in_flight_end[name] = round(took, 3)
                if hit[0].outcome != "ok" and took > FAIL_SECONDS:
                    verdict.problems.append(
                        f"{name}: the operation in flight took {took:.1f} s to fail "
                        f"(bound {FAIL_SECONDS} s)"
                    )
    return verdict


def record_recovery(verdict: FaultVerdict, flow: str, seconds: float | None) -> None:
    verdict.recovery[flow] = None if seconds is None else round(seconds, 3)
    if seconds is None:
        verdict.problems.append(
            f"{flow}: no new connection worked within {RECOVERY_SECONDS} s of the repair"
        )


@dataclass
class Summary:
    """Totals over a chaos run (what `make chaos` prints and writes as JSON)."""

    mode: str
    faults_injected: int = 0
    connections_checked: int = 0
    corrupted: int = 0
    hangs: int = 0
    clean_failures: int = 0
    leaks_found: int = 0
    problems: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    worst_recovery_seconds: float = 0.0
    worst_in_flight_end_seconds: float = 0.0
    faults: dict[str, int] = field(default_factory=dict)  # kind -> times injected
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # one per fault injected

    def add_ops(self, ops: Iterable[Op]) -> None:
        for op in ops:
            self.connections_checked += 1
            self.corrupted += op.outcome == "corrupt"
            self.hangs += op.outcome == "hang"
            self.clean_failures += op.outcome == "reset"

    def add_fault(self, kind: str, verdict: FaultVerdict) -> None:
        self.faults_injected += 1
        self.faults[kind] = self.faults.get(kind, 0) + 1
        self.verdicts.append(verdict.as_json())
        self.problems += [f"{verdict.fault}: {p}" for p in verdict.problems]
        recoveries = [s for s in verdict.recovery.values() if s is not None]
        self.worst_recovery_seconds = max([self.worst_recovery_seconds, *recoveries])
        self.worst_in_flight_end_seconds = max(
            [self.worst_in_flight_end_seconds, *verdict.in_flight_end.values()]
        )

    def add_leaks(self, leaks: Iterable[str]) -> None:
        found = list(leaks)
        self.leaks += found
        self.leaks_found += len(found)

    @property
    def ok(self) -> bool:
        return not (self.problems or self.corrupted or self.hangs or self.leaks_found)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def lines(self) -> list[str]:
        return [
            f"mode {self.mode}: faults injected {self.faults_injected} "
            f"({', '.join(f'{k} {n}' for k, n in sorted(self.faults.items()))})",
            f"  connections checked {self.connections_checked}, corrupted {self.corrupted}, "
            f"hangs {self.hangs}, clean failures {self.clean_failures}, "
            f"leaks found {self.leaks_found}",
            f"  worst: in-flight end {self.worst_in_flight_end_seconds:.2f} s after a fault, "
            f"recovery {self.worst_recovery_seconds:.2f} s after a repair",
            *(f"  problem: {p}" for p in self.problems),
            *(f"  leak: {leak}" for leak in self.leaks),
        ]
