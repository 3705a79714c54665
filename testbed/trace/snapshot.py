"""One look at a namespace: rule counters, interface counters, conntrack, proxy records.

A trace takes one before the connection and one after it in every namespace that can be on
the path, all in parallel, and diffs the two.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from testbed.netlab import Netns
from testbed.trace import conntrack, links, netfilter, proxies

WORKERS = 8


@dataclass
class Snapshot:
    rules: list[netfilter.RuleCount] = field(default_factory=list)
    links: list[links.Link] = field(default_factory=list)
    entries: list[conntrack.Entry] = field(default_factory=list)
    proxy: proxies.ProxyView = field(default_factory=proxies.ProxyView)
    conntrack_source: str = ""
    programs: dict[tuple[str, str], str] = field(default_factory=dict)


def conntrack_argv() -> tuple[list[str], str]:
    """conntrack-tools where installed, else the kernel's /proc table (same fields)."""
    if shutil.which("conntrack"):
        return ["conntrack", "-L"], "conntrack -L"
    return ["cat", "/proc/net/nf_conntrack"], "/proc/net/nf_conntrack"


def take(netns: Netns, since: int = 0) -> Snapshot:
    snap = Snapshot()
    saved = netns.run(["iptables-save", "-c"], check=False)
    snap.rules = netfilter.parse_iptables_save(saved.stdout)
    nft = netns.run(["nft", "-j", "list", "ruleset"], check=False)
    if nft.returncode == 0:
        snap.rules += netfilter.parse_nft_json(nft.stdout)
    snap.links = links.parse_links(netns.run(["ip", "-d", "-s", "-j", "link", "show"]).stdout)
    argv, snap.conntrack_source = conntrack_argv()
    listed = netns.run(argv, check=False)
    if listed.returncode == 0:
        snap.entries = conntrack.parse_entries(listed.stdout)
    else:
        snap.conntrack_source = "unavailable"
    snap.proxy = proxies.read_proxy(netns, since)
    snap.programs = tc_programs(netns)
    return snap


def tc_programs(netns: Netns) -> dict[tuple[str, str], str]:
    """(device, ingress|egress) -> names of the tc BPF programs attached there (bpftool net
    show; tcx links are invisible to bpftool 7.1 and absent here)."""
    if not shutil.which("bpftool"):
        return {}
    done = netns.run(["bpftool", "-j", "net", "show"], check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return {}
    found: dict[tuple[str, str], str] = {}
    for section in json.loads(done.stdout):
        for item in section.get("tc", []) if isinstance(section, dict) else []:
            direction = str(item.get("kind", "")).rpartition("/")[2]
            key = (str(item.get("devname")), direction)
            found[key] = ", ".join(
                filter(None, [found.get(key), str(item.get("name")).split(":")[0]])
            )
    return found


def take_all(
    namespaces: dict[str, Netns], earlier: dict[str, Snapshot] | None = None
) -> dict[str, Snapshot]:
    """Snapshots of every namespace; after `earlier` ones, only newer proxy records."""
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {
            name: pool.submit(take, ns, _last_id(earlier.get(name) if earlier else None))
            for name, ns in namespaces.items()
        }
        return {name: future.result() for name, future in futures.items()}


def _last_id(snap: Snapshot | None) -> int:
    records = snap.proxy.records if snap else None
    return max((r.id for r in records), default=0) if records else 0
