"""A snapshot of the host's root network namespace, to prove the testbed leaves it alone."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

COMMANDS = {
    "addr": ["ip", "-o", "addr", "show"],
    "link": ["ip", "-o", "link", "show"],
    "route": ["ip", "route", "show", "table", "all"],
    "rule": ["ip", "rule", "show"],
    "iptables": ["iptables-save"],
    "nft": ["nft", "list", "ruleset"],
}
# Counters and timestamps change on their own; they are not configuration.
_VOLATILE = re.compile(r"^#.*$|\[\d+:\d+\]|\s+(expires|used) \d+sec", re.M)


def _sysctls() -> str:
    values = []
    for root, _, files in os.walk("/proc/sys/net"):
        for name in files:
            path = Path(root, name)
            if "nf_conntrack_count" in name or "stat" in name:
                continue
            try:
                values.append(f"{path}={path.read_text().strip()}")
            except OSError:
                continue
    return "\n".join(sorted(values))


def root_namespace_state() -> dict[str, str]:
    state = {}
    for key, argv in COMMANDS.items():
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        state[key] = _VOLATILE.sub("", done.stdout)
    state["sysctl"] = _sysctls()
    return state


def netns_of_run(run: str) -> list[str]:
    netns_dir = Path("/run/netns")
    if not netns_dir.is_dir():
        return []
    return sorted(p.name for p in netns_dir.iterdir() if p.name.startswith(f"tb-{run}-"))
