"""Faults under load, the long version (`make chaos DURATION=120 MODES=inpod,legacy,ebpf`).

For each mode: build the chaos topology (testbed.chaos.topology), run its flows
(sha256-checked bulk transfers and fixed-rate HTTP), and inject its faults one after the
other, round after round, for DURATION seconds: SIGKILL and restart of a ztunnel, the
waypoint and (inpod) the CNI agent, unenrol/enrol of a pod, a DENY policy applied and
removed, a node's underlay link down and up. Then the leak checks (proxies' descriptors
back to baseline, no process left in the run's namespaces, manifest gone after teardown).

Prints a summary per mode and writes them all as JSON (--out). Exits 1 if any mode saw a
corrupted transfer, a hang, a broken bound or a leak.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from testbed.chaos.rig import Rig
from testbed.chaos.verdict import FAIL_SECONDS, RECOVERY_SECONDS, Summary
from testbed.redirect import available_modes

ROOT = Path("/run/testbed-chaos")  # the manifest root of chaos runs: ours alone
PAUSE_SECONDS = 2.0  # traffic flows undisturbed this long between two faults


def run_mode(mode: str, duration: float, root: Path) -> Summary:
    summary = Summary(mode)
    rig = Rig.build(mode, root=root)
    try:
        rig.warm_up()
        rig.start_flows()
        faults = list(rig.faults().values())
        started = time.monotonic()
        round_ = 0
        while time.monotonic() - started < duration:
            fault = faults[round_ % len(faults)]
            round_ += 1
            time.sleep(PAUSE_SECONDS)
            verdict = rig.apply(fault)
            summary.add_fault(fault.kind, verdict)
            state = "ok" if verdict.ok else "; ".join(verdict.problems)
            print(f"  {mode} {time.monotonic() - started:6.1f} s {fault.name}: {state}", flush=True)
        rig.stop_flows()
        for ops in rig.ops().values():
            summary.add_ops(ops)
        summary.add_leaks(rig.fd_leaks())
    finally:
        summary.add_leaks(rig.teardown())
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds per mode")
    parser.add_argument("--modes", default="inpod,legacy,ebpf")
    parser.add_argument("--out", type=Path, default=Path("results/chaos/summary.json"))
    parser.add_argument("--root", type=Path, default=ROOT, help="manifest root of the runs")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in available_modes()]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; available: {available_modes()}")
    summaries = []
    for mode in modes:
        print(f"chaos: mode {mode} for {args.duration:.0f} s", flush=True)
        summaries.append(run_mode(mode, args.duration, args.root))
    print(f"bounds: in-flight end {FAIL_SECONDS} s, recovery {RECOVERY_SECONDS} s")
    for summary in summaries:
        print("\n".join(summary.lines()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "duration_per_mode": args.duration,
        "bounds": {"in_flight_end_seconds": FAIL_SECONDS, "recovery_seconds": RECOVERY_SECONDS},
        "modes": [s.as_json() for s in summaries],
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"summary: {args.out}")
    return 0 if all(s.ok for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
