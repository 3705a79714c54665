"""Time building and tearing down a large cluster (issue #2's numbers).

.venv/bin/python scripts/bench_build.py "multi_node,nodes=2,pods=250" --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import time

from testbed.cluster import Cluster, load_topology
from testbed.redirect import create_mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("topology", nargs="?", default="multi_node,nodes=2,pods=250")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ups, downs = [], []
    for _ in range(args.repeat):
        cluster = Cluster(load_topology(args.topology), create_mode("none"))
        started = time.perf_counter()
        cluster.start()
        ups.append(time.perf_counter() - started)
        started = time.perf_counter()
        cluster.stop()
        downs.append(time.perf_counter() - started)
    print(
        f"{args.topology}: up median {statistics.median(ups):.2f} s {[round(u, 2) for u in ups]}, "
        f"down median {statistics.median(downs):.2f} s {[round(d, 2) for d in downs]}"
    )


if __name__ == "__main__":
    main()
