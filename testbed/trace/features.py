"""Whether this kernel and these tools can trace packets through netfilter (for
`testbed doctor`): nftables tracing (`meta nftrace set 1` + `nft monitor trace`) and
`xtables-monitor --trace` for iptables-nft rules. Probed in a throwaway network namespace
(`unshare --net`), never in the host's."""

from __future__ import annotations

import functools
import shutil
import subprocess
from dataclasses import dataclass

_PROBE_RULES = (
    "add table inet tbprobe\n"
    "add chain inet tbprobe out { type filter hook output priority -350; }\n"
    "add rule inet tbprobe out meta nftrace set 1\n"
)


@dataclass(frozen=True)
class TracingFeature:
    name: str
    ok: bool
    detail: str
    needed_by: str = "testbed trace (rule-by-rule evidence; counters are the fallback)"
    essential: bool = False

    def as_dict(self) -> dict[str, object]:
        return self.__dict__.copy()


def detect_tracing() -> list[TracingFeature]:
    nft = _probe_nftrace()
    xt = shutil.which("xtables-monitor")
    xtables = TracingFeature(
        "xtables-monitor --trace",
        bool(xt) and nft.ok,
        (
            f"{xt} (needs nftrace, {'ok' if nft.ok else 'missing'})"
            if xt
            else "xtables-monitor not installed (package iptables)"
        ),
    )
    return [nft, xtables]


@functools.cache
def tracing_usable() -> bool:
    """Whether a trace can use nftrace with xtables-monitor (probed once per process)."""
    return bool(shutil.which("xtables-monitor")) and _probe_nftrace().ok


def _probe_nftrace() -> TracingFeature:
    name = "nftables tracing"
    if not shutil.which("nft") or not shutil.which("unshare"):
        return TracingFeature(name, False, "nft or unshare not installed")
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
        return TracingFeature(name, False, f"probe failed: {exc}")
    if done.returncode != 0:
        return TracingFeature(name, False, f"meta nftrace rejected: {done.stderr.strip()[:120]}")
    return TracingFeature(name, True, "meta nftrace set 1 accepted (nft monitor trace)")
