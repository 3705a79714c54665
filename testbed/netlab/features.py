"""Kernel feature and tool detection, done inside a scratch namespace of a throwaway run.

Nothing is probed in the host's namespace: each probe creates what it needs inside a
namespace recorded in a doctor run's manifest, which is cleaned afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from testbed.netlab import links
from testbed.netlab.lab import Lab
from testbed.netlab.netns import Netns
from testbed.netlab.process import NetlabError

TCP_ULP = 31


@dataclass(frozen=True)
class Feature:
    name: str
    ok: bool
    detail: str
    needed_by: str
    essential: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _ok_run(ns: Netns, argv: list[str], input: str | None = None) -> tuple[bool, str]:
    try:
        done = ns.run(argv, check=False, input=input, timeout=20)
    except NetlabError as exc:
        return False, str(exc)
    text = (done.stderr or done.stdout).strip().splitlines()
    return done.returncode == 0, (text[-1] if text else "")


def _link_probe(ns: Netns, kind: str, **attrs: object) -> tuple[bool, str]:
    name = f"probe{kind[:6]}"
    try:
        with ns.iproute() as ipr:
            ipr.link("add", ifname=name, kind=kind, **attrs)
            ipr.link("del", index=links.ifindex(ipr, name))
        return True, "can be created"
    except Exception as exc:  # netlink reports missing kinds as various errors
        return False, f"cannot create a {kind} link: {exc}"


def _qdisc_probe(ns: Netns, args: list[str]) -> tuple[bool, str]:
    ok, detail = _ok_run(ns, ["tc", "qdisc", "add", "dev", "probeveth", *args])
    if ok:
        _ok_run(ns, ["tc", "qdisc", "del", "dev", "probeveth", "root"])
        _ok_run(ns, ["tc", "qdisc", "del", "dev", "probeveth", "clsact"])
    return ok, detail or "ok"


def _iptables_probe(ns: Netns, table: str, rule: str) -> tuple[bool, str]:
    rules = f"*{table}\n{rule}\nCOMMIT\n"
    ok, detail = _ok_run(ns, ["iptables-restore", "--noflush"], input=rules)
    return ok, detail or "ok"


def _ktls_probe(ns: Netns) -> tuple[bool, str]:
    with ns.entered():
        with ns.iproute() as ipr:
            links.loopback_up(ipr)
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname(), timeout=5)
    try:
        client.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
        return True, "TCP_ULP tls accepted"
    except OSError as exc:
        reason = "tls module not in this kernel" if exc.errno == errno.ENOENT else str(exc)
        return False, reason
    finally:
        client.close()
        server.close()


def _bpf_helper_probe() -> tuple[bool, str]:
    if shutil.which("bpftool") is None:
        return False, "bpftool not installed"
    done = subprocess.run(
        ["bpftool", "feature", "probe", "kernel"], capture_output=True, text=True, check=False
    )
    section = done.stdout.split("eBPF helpers supported for program type sched_cls:", 1)
    if len(section) < 2:
        return False, "bpftool could not probe sched_cls helpers"
    helpers = section[1].split("eBPF helpers supported for program type", 1)[0]
    ok = "bpf_sk_assign" in helpers and "bpf_redirect" in helpers
    return ok, "bpf_redirect and bpf_sk_assign for tc" if ok else "bpf_sk_assign missing"


def _tool(name: str, needed_by: str, essential: bool = False) -> Feature:
    path = shutil.which(name)
    return Feature(f"tool {name}", path is not None, path or "not installed", needed_by, essential)


TOOLS = [
    ("ip", "everything", True),
    ("nsenter", "running processes in namespaces", True),
    ("tc", "link shaping, ebpf mode", True),
    ("iptables-restore", "inpod, sidecar, legacy modes, kube-proxy", True),
    ("nft", "inpod nftables variant", False),
    ("ipset", "legacy mode", False),
    ("iperf3", "throughput measurements", False),
    ("sockperf", "latency measurements", False),
    ("ping", "ping, ping_all", False),
    ("tcpdump", "wire captures in tests", False),
    ("openssl", "TLS interop checks", False),
    ("clang", "ebpf mode (build)", False),
    ("bpftool", "ebpf mode (vmlinux.h, probing)", False),
]


def detect_features() -> list[Feature]:
    lab = Lab.create(f"doc{uuid.uuid4().hex[:8]}")
    try:
        return _probe_all(lab)
    finally:
        lab.teardown()


def _probe_all(lab: Lab) -> list[Feature]:
    ns = lab.add_netns("probe")
    peer = lab.add_netns("peer")
    with ns.iproute() as ipr:
        links.loopback_up(ipr)
        veth = links.add_veth(ipr, "probeveth", peer, "eth0")
        links.set_up(ipr, veth)
    checks: list[tuple[str, str, bool, Callable[[], tuple[bool, str]]]] = [
        ("netns", "everything", True, lambda: (True, "network namespaces work")),
        ("veth", "everything", True, lambda: (True, "veth pairs work")),
        ("bridge", "underlay fabric", True, lambda: _link_probe(ns, "bridge")),
        (
            "vxlan",
            "legacy mode tunnels (fallback)",
            False,
            lambda: _link_probe(ns, "vxlan", vxlan_id=42, vxlan_port=4789),
        ),
        (
            "geneve",
            "legacy mode tunnels (Istio's choice)",
            False,
            lambda: _link_probe(ns, "geneve", geneve_id=42, geneve_remote="192.0.2.1"),
        ),
        (
            "htb",
            "link rate shaping",
            False,
            lambda: _qdisc_probe(ns, ["root", "handle", "1:", "htb"]),
        ),
        (
            "tbf",
            "link rate shaping",
            False,
            lambda: _qdisc_probe(
                ns, ["root", "tbf", "rate", "1gbit", "burst", "64kb", "latency", "50ms"]
            ),
        ),
        (
            "netem",
            "link delay and loss",
            False,
            lambda: _qdisc_probe(ns, ["root", "netem", "delay", "1ms"]),
        ),
        ("clsact", "ebpf mode", False, lambda: _qdisc_probe(ns, ["clsact"])),
        (
            "iptables REDIRECT",
            "inpod (redirect), sidecar, kube-proxy",
            True,
            lambda: _iptables_probe(
                ns, "nat", "-A OUTPUT -p tcp -d 192.0.2.1 -j REDIRECT --to-ports 1"
            ),
        ),
        (
            "iptables TPROXY",
            "inpod (tproxy), legacy",
            False,
            lambda: _iptables_probe(
                ns,
                "mangle",
                "-A PREROUTING -p tcp -d 192.0.2.1 -j TPROXY --on-port 1 --tproxy-mark 0x1/0x1",
            ),
        ),
        (
            "iptables socket match",
            "inpod (tproxy), legacy",
            False,
            lambda: _iptables_probe(
                ns, "mangle", "-A PREROUTING -p tcp -d 192.0.2.1 -m socket -j ACCEPT"
            ),
        ),
        (
            "nftables",
            "inpod (nftables)",
            False,
            lambda: _ok_run(ns, ["nft", "add", "table", "inet", "probe"]),
        ),
        (
            "ipset",
            "legacy mode",
            False,
            lambda: _ok_run(ns, ["ipset", "create", "probe", "hash:ip"]),
        ),
        ("bpf_sk_assign", "ebpf mode", False, _bpf_helper_probe),
        (
            "ktls",
            "TLS splicing (not used; Python proxies copy TLS bytes)",
            False,
            lambda: _ktls_probe(peer),
        ),
    ]
    found = []
    for name, needed_by, essential, probe in checks:
        try:
            ok, detail = probe()
        except Exception as exc:
            ok, detail = False, str(exc)
        found.append(Feature(name, ok, detail, needed_by, essential))
    with contextlib.suppress(Exception):
        found.extend(_tool(*tool) for tool in TOOLS)
    return found


def detect_netem(lab: Lab) -> bool:
    """Whether the netem qdisc exists, probed in a scratch namespace of `lab`."""
    ns = lab.add_netns("netem-probe")
    peer = lab.add_netns("netem-peer")
    with ns.iproute() as ipr:
        links.add_veth(ipr, "probeveth", peer, "eth0")
    ok, _ = _qdisc_probe(ns, ["root", "netem", "delay", "1ms"])
    return ok
