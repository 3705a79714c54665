"""`testbed soak` (`make soak DURATION=10m`): time under load, and whether the proxies keep
what they should release.

Builds reviews_waypoint (two nodes, a waypoint in front of reviews-v1/v2) in one mode and for
DURATION runs, all at once: bulk transfers (iperf3 capped at 100 Mbit/s, 5 s each, across the
nodes), fixed-rate HTTP through the waypoint (http_load to the reviews VIP), connection churn
(the rr client's new-connection-per-request mode, 20 s runs: 10k+ connections over 10
minutes), and every 30 s a policy change as a user would `testbed apply` it: an L4 DENY of
the churn port on reviews-v2, then its removal, then an L7 DENY of /echo on reviews (the
waypoint answers 403), then its removal. Every few seconds it samples each proxy process
(ztunnels, waypoint, CNI agents): open fds, RSS, CPU, pooled HBONE connections
(testbed.soak.sample). At the end: tidy rows (samples.csv, samples.parquet), soak.png (one
panel per metric) and summary.txt in results/soak/<time>-<mode>/, and a verdict per proxy
and metric from the least-squares slope over the second half (testbed.soak.leak, whose
thresholds say why they are what they are). Exit 1 when anything grows without bound.
"""

from testbed.soak.leak import THRESHOLDS, Threshold, Verdict, judge, judge_rows
from testbed.soak.run import SoakError, SoakOptions, SoakResult, parse_duration, run_soak

__all__ = [
    "THRESHOLDS",
    "SoakError",
    "SoakOptions",
    "SoakResult",
    "Threshold",
    "Verdict",
    "judge",
    "judge_rows",
    "parse_duration",
    "run_soak",
]
