"""Whether this kernel and these tools can trace packets through netfilter (for
`testbed doctor`): nftables tracing (`meta nftrace set 1` + `nft monitor trace`) and
`xtables-monitor --trace` for iptables-nft rules. Probed in a throwaway network namespace
(`unshare --net`), never in the host's."""

from __future__ import annotations

import functools
import shutil
import subprocess

from testbed.netlab.features import Feature

_PROBE_RULES = (
    "add table inet tbprobe\n"
    "add chain inet tbprobe out { type filter hook output priority -350; }\n"
    "add rule inet tbprobe out meta nftrace set 1\n"
)


NEEDED_BY = "testbed trace (rule-by-rule evidence; counters are the fallback)"


def detect_tracing() -> list[Feature]:
    nft = _probe_nftrace()
    xt = shutil.which("xtables-monitor")
    xtables = Feature(
        "xtables-monitor --trace",
        bool(xt) and nft.ok,
        (
            f"{xt} (needs nftrace, {'ok' if nft.ok else 'missing'})"
            if xt
            else "xtables-monitor not installed (package iptables)"
        ),
        NEEDED_BY,
    )
    return [nft, xtables]


@functools.cache
def tracing_usable() -> bool:
    """Whether a trace can use nftrace with xtables-monitor (probed once per process)."""
    return bool(shutil.which("xtables-monitor")) and _probe_nftrace().ok


def _probe_nftrace() -> Feature:
    name = "nftables tracing"
    if not shutil.which("nft") or not shutil.which("unshare"):
        return Feature(name, False, "nft or unshare not installed", NEEDED_BY)
    try:
        done = subprocess.run(
            ["unshare", "--net", "nft", "-f", "-"],
            input=_PROBE_RULES,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Feature(name, False, f"probe failed: {exc}", NEEDED_BY)
    if done.returncode != 0:
        return Feature(
            name, False, f"meta nftrace rejected: {done.stderr.strip()[:120]}", NEEDED_BY
        )
    return Feature(name, True, "meta nftrace set 1 accepted (nft monitor trace)", NEEDED_BY)
