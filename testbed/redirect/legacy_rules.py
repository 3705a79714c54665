"""Node-level rules of Istio's legacy ambient redirection (Istio 1.15-1.20, docs/architecture.md).

Two places are configured, as Istio's CNI agent (`cni/pkg/ambient`, release-1.20) did:

- the node namespace: mangle/nat/filter chains `ztunnel-*`, the ipset `ztunnel-pods-ips`,
  route tables 100 (enrolled pods via `istioin`), 101 (everything via `istioout`) and 102
  (straight to the ztunnel veth), ip rules 100-103, rp_filter off and accept_local on;
- the ztunnel pod's namespace: TPROXY from the tunnel ends `pistioin`/`pistioout` to
  15008/15006/15001, the mark 0x4d3 for replies to ztunnel's original-source connections,
  ip rules 20000/20003 and the local route table 100; plus one testbed rule (20002) per
  enrolled pod that delivers ztunnel's HBONE to that pod locally, to ztunnel's own 15008
  (used with the same-node fast path off). Only captured pods: HBONE to an uncaptured pod of
  the node (a waypoint) must reach that pod's own 15008.

The tunnels are geneve where the kernel has it and VXLAN otherwise, with the same VNIs and
addresses either way; only the UDP port the node's rules let through differs. Rules are
written in the form `iptables-save` prints, so a rule set read back compares equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from testbed.netlab.host import CommandRunner
from testbed.redirect.rules import (
    IpCommand,
    Rule,
    RuleMap,
    by_chain,
    installed_iptables_rules,
    remove_iptables_chains,
)

TunnelKind = Literal["geneve", "vxlan"]
TUNNEL_PORTS: dict[TunnelKind, int] = {"geneve": 6081, "vxlan": 4789}

IPSET = "ztunnel-pods-ips"
OUTBOUND_MARK = "0x100/0x100"  # TCP from an enrolled pod: to ztunnel via istioout
SKIP_MARK = "0x200/0x200"  # routed by the main table
CONN_SKIP_MARK = "0x220/0x220"  # skip, remembered on the connection
PROXY_MARK = "0x210/0x210"  # from ztunnel with a pod's (original) source address
PROXY_RETURN_MARK = "0x40/0x40"  # replies to those: straight back to the ztunnel veth
TPROXY_MARK = "0x400/0xfff"  # ztunnel netns: TPROXY'd packets -> local table
ORIGINAL_SOURCE_RETURN_MARK = "0x4d3/0xfff"  # ztunnel netns: replies to spoofed sockets

INBOUND_TABLE, OUTBOUND_TABLE, PROXY_TABLE = "100", "101", "102"
TPROXY_RULE_PRIORITY, ORIGINAL_SOURCE_RULE_PRIORITY = "20000", "20003"
# Testbed addition: ztunnel's HBONE to an enrolled pod of its own node is delivered locally
# (Istio's legacy ztunnel short-cut same-node traffic inside the process instead), one rule
# per enrolled pod, added and removed with it.
LOCAL_HBONE_RULE_PRIORITY = "20002"
NODE_RULE_PRIORITIES = ("100", "101", "102", "103")
ZTUNNEL_RULE_PRIORITIES = (
    TPROXY_RULE_PRIORITY,
    LOCAL_HBONE_RULE_PRIORITY,
    ORIGINAL_SOURCE_RULE_PRIORITY,
)
TABLES = (INBOUND_TABLE, OUTBOUND_TABLE, PROXY_TABLE)

OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT = 15001, 15006, 15008

PREROUTING, POSTROUTING = "ztunnel-PREROUTING", "ztunnel-POSTROUTING"
INPUT, OUTPUT, FORWARD = "ztunnel-INPUT", "ztunnel-OUTPUT", "ztunnel-FORWARD"
NODE_CHAINS = (PREROUTING, POSTROUTING, INPUT, OUTPUT, FORWARD)
# (table, chain, built-in chain it is jumped to from), in Istio's creation order
_CHAIN_JUMPS = (
    ("nat", PREROUTING, "PREROUTING"),
    ("nat", POSTROUTING, "POSTROUTING"),
    ("mangle", PREROUTING, "PREROUTING"),
    ("mangle", POSTROUTING, "POSTROUTING"),
    ("mangle", OUTPUT, "OUTPUT"),
    ("mangle", INPUT, "INPUT"),
    ("mangle", FORWARD, "FORWARD"),
    ("filter", FORWARD, "FORWARD"),
)


@dataclass(frozen=True)
class Tunnel:
    """One end of a tunnel between the node and its ztunnel pod."""

    name: str
    vni: int
    address: str  # this end's /30 address
    peer_address: str  # the other end's
    local: str  # underlay (outer) addresses
    remote: str
    underlay_dev: str


PREFIX = 30
INBOUND_TUNNEL, OUTBOUND_TUNNEL = "istioin", "istioout"
# the ztunnel pod's ends ("p" tells them apart from the node's in logs, as Istio's do)
POD_INBOUND_TUNNEL, POD_OUTBOUND_TUNNEL = "p" + INBOUND_TUNNEL, "p" + OUTBOUND_TUNNEL
INBOUND_VNI, OUTBOUND_VNI = 1000, 1001
NODE_INBOUND_IP, ZTUNNEL_INBOUND_IP = "192.168.126.1", "192.168.126.2"
NODE_OUTBOUND_IP, ZTUNNEL_OUTBOUND_IP = "192.168.127.1", "192.168.127.2"
ZTUNNEL_DEV = "eth0"  # the ztunnel pod's veth end


@dataclass(frozen=True)
class NodeFacts:
    """What the rules of one node depend on."""

    host_ip: str  # the node's address; the tunnels' node end and src of pod routes
    ztunnel_ip: str
    ztunnel_veth: str  # host side of the ztunnel pod's veth
    tunnel: TunnelKind

    @property
    def tunnel_port(self) -> int:
        return TUNNEL_PORTS[self.tunnel]


# ---------------------------------------------------------------- node namespace


def _mangle_prerouting(facts: NodeFacts) -> list[Rule]:
    zveth, zip_ = facts.ztunnel_veth, facts.ztunnel_ip

    def rule(spec: str) -> Rule:
        return Rule("mangle", PREROUTING, spec)

    skip = f"-j MARK --set-xmark {SKIP_MARK}"
    return [
        # what comes out of the tunnels is skipped, without remembering it on the connection
        rule(f"-i {INBOUND_TUNNEL} {skip}"),
        rule(f"-i {INBOUND_TUNNEL} -j RETURN"),
        rule(f"-i {OUTBOUND_TUNNEL} {skip}"),
        rule(f"-i {OUTBOUND_TUNNEL} -j RETURN"),
        # the tunnel packets themselves: the tunnel copies the mark to the inner packet
        rule(f"-p udp -m udp --dport {facts.tunnel_port} -j RETURN"),
        rule(f"-m connmark --mark {CONN_SKIP_MARK} {skip}"),
        rule(f"-m mark --mark {SKIP_MARK} -j RETURN"),
        # replies to ztunnel's original-source connections go back to ztunnel directly
        rule(
            f"! -i {zveth} -m connmark --mark {PROXY_MARK} -j MARK --set-xmark {PROXY_RETURN_MARK}"
        ),
        rule(f"-m mark --mark {PROXY_RETURN_MARK} -j RETURN"),
        rule(f"! -s {zip_}/32 -i {zveth} -j MARK --set-xmark {PROXY_MARK}"),
        rule(f"-m mark --mark {SKIP_MARK} -j RETURN"),
        # ztunnel's own connections (xDS, HBONE to other nodes) are routed normally
        rule(f"-i {zveth} -j MARK --set-xmark {CONN_SKIP_MARK}"),
        rule(f"-p udp -j MARK --set-xmark {CONN_SKIP_MARK}"),
        rule(f"-m mark --mark {SKIP_MARK} -j RETURN"),
        rule(f"-p tcp -m set --match-set {IPSET} src -j MARK --set-xmark {OUTBOUND_MARK}"),
    ]


def _save_connmark(chain: str, mark: str) -> Rule:
    mask = mark.split("/")[1]
    return Rule(
        "mangle",
        chain,
        f"-m mark --mark {mark} -j CONNMARK --save-mark --nfmask {mask} --ctmask {mask}",
    )


def node_iptables_rules(facts: NodeFacts) -> list[Rule]:
    """Every node rule, jumps from the built-in chains first (Istio inserts them at the top)."""
    jumps = [Rule(table, builtin, f"-j {chain}") for table, chain, builtin in _CHAIN_JUMPS]
    outbound_accept = f"-m mark --mark {OUTBOUND_MARK} -j ACCEPT"
    return [
        *jumps,
        *_mangle_prerouting(facts),
        _save_connmark(FORWARD, CONN_SKIP_MARK),
        _save_connmark(INPUT, CONN_SKIP_MARK),
        _save_connmark(FORWARD, PROXY_MARK),
        _save_connmark(INPUT, PROXY_MARK),
        Rule("mangle", OUTPUT, f"-s {facts.host_ip}/32 -j MARK --set-xmark 0x220/0xffffffff"),
        # outbound-marked packets skip kube-proxy: ztunnel resolves service VIPs itself
        Rule("nat", PREROUTING, outbound_accept),
        Rule("nat", POSTROUTING, outbound_accept),
        Rule("filter", FORWARD, outbound_accept),
    ]


def render_node_iptables(facts: NodeFacts) -> str:
    """`iptables-restore --noflush` input; jumps are inserted ahead of kube-proxy's."""
    rules = node_iptables_rules(facts)
    lines: list[str] = []
    for table in ("mangle", "nat", "filter"):
        lines.append(f"*{table}")
        lines += [f":{chain} - [0:0]" for t, chain, _ in _CHAIN_JUMPS if t == table]
        for rule in rules:
            if rule.table == table:
                verb = "-I" if rule.chain not in NODE_CHAINS else "-A"
                lines.append(f"{verb} {rule.chain} {rule.spec}")
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _route(*args: str) -> IpCommand:
    return IpCommand("route", args)


def _rule(*args: str) -> IpCommand:
    return IpCommand("rule", args)


def node_routing(facts: NodeFacts) -> list[IpCommand]:
    """Route tables 101/102/100 and rules 100-103, in Istio's order (after the tunnels)."""
    zveth, zip_ = facts.ztunnel_veth, facts.ztunnel_ip
    scoped = ("dev", zveth, "scope", "link")
    return [
        _route("table", OUTBOUND_TABLE, zip_, *scoped),
        _route(
            "table", OUTBOUND_TABLE, "0.0.0.0/0", "via", ZTUNNEL_OUTBOUND_IP, "dev", OUTBOUND_TUNNEL
        ),
        _route("table", PROXY_TABLE, zip_, *scoped),
        _route("table", PROXY_TABLE, "0.0.0.0/0", "via", zip_, "dev", zveth, "onlink"),
        _route("table", INBOUND_TABLE, zip_, *scoped),
        _rule("priority", "100", "fwmark", SKIP_MARK, "goto", "32766"),
        _rule("priority", "101", "fwmark", OUTBOUND_MARK, "lookup", OUTBOUND_TABLE),
        _rule("priority", "102", "fwmark", PROXY_RETURN_MARK, "lookup", PROXY_TABLE),
        _rule("priority", "103", "lookup", INBOUND_TABLE),
    ]


def node_sysctls(facts: NodeFacts) -> dict[str, int]:
    """Packets with pod sources arrive from the ztunnel veth and the tunnels: no rp_filter."""
    values = {"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0}
    for dev in (facts.ztunnel_veth, INBOUND_TUNNEL, OUTBOUND_TUNNEL):
        values[f"net.ipv4.conf.{dev}.rp_filter"] = 0
        values[f"net.ipv4.conf.{dev}.accept_local"] = 1
    return values


def node_tunnels(facts: NodeFacts) -> list[Tunnel]:
    ends = (facts.host_ip, facts.ztunnel_ip, facts.ztunnel_veth)
    return [
        Tunnel(INBOUND_TUNNEL, INBOUND_VNI, NODE_INBOUND_IP, ZTUNNEL_INBOUND_IP, *ends),
        Tunnel(OUTBOUND_TUNNEL, OUTBOUND_VNI, NODE_OUTBOUND_IP, ZTUNNEL_OUTBOUND_IP, *ends),
    ]


def pod_route(pod_ip: str, host_ip: str) -> IpCommand:
    """Table 100 entry of an enrolled pod: traffic to it goes through ztunnel's inbound."""
    via = ("via", ZTUNNEL_INBOUND_IP, "dev", INBOUND_TUNNEL, "src", host_ip)
    return _route("table", INBOUND_TABLE, f"{pod_ip}/32", *via)


def ipset_create() -> list[str]:
    return ["ipset", "create", IPSET, "hash:ip", "-exist"]


def ipset_member(action: Literal["add", "del"], pod_ip: str) -> list[str]:
    return ["ipset", action, IPSET, pod_ip, "-exist"]


# ---------------------------------------------------------------- ztunnel namespace


def ztunnel_iptables_rules(facts: NodeFacts) -> list[Rule]:
    """TPROXY from the tunnel ends to ztunnel's listeners (Istio writes PREROUTING itself)."""
    inbound, outbound = POD_INBOUND_TUNNEL, POD_OUTBOUND_TUNNEL
    tproxy = f"--on-ip 127.0.0.1 --tproxy-mark {TPROXY_MARK}"

    def rule(spec: str) -> Rule:
        return Rule("mangle", "PREROUTING", spec)

    return [
        rule(
            f"-i {inbound} -p tcp -m tcp --dport {HBONE_PORT}"
            f" -j TPROXY --on-port {HBONE_PORT} {tproxy}"
        ),
        rule(f"-i {outbound} -p tcp -j TPROXY --on-port {OUTBOUND_PORT} {tproxy}"),
        rule(f"-i {inbound} -p tcp -j TPROXY --on-port {INBOUND_PLAINTEXT_PORT} {tproxy}"),
        rule(
            f"! -d {facts.ztunnel_ip}/32 -i {ZTUNNEL_DEV} -p tcp"
            f" -j MARK --set-xmark {ORIGINAL_SOURCE_RETURN_MARK}"
        ),
    ]


def ztunnel_routing(facts: NodeFacts) -> list[IpCommand]:
    host = f"{facts.host_ip}/32"
    original_source = ("fwmark", ORIGINAL_SOURCE_RETURN_MARK, "lookup", INBOUND_TABLE)
    return [
        _rule("priority", TPROXY_RULE_PRIORITY, "fwmark", TPROXY_MARK, "lookup", INBOUND_TABLE),
        _rule("priority", ORIGINAL_SOURCE_RULE_PRIORITY, *original_source),
        _route("local", "0.0.0.0/0", "dev", "lo", "table", INBOUND_TABLE),
        _route(
            "table",
            OUTBOUND_TABLE,
            "0.0.0.0/0",
            "via",
            NODE_OUTBOUND_IP,
            "dev",
            POD_OUTBOUND_TUNNEL,
        ),
        _route(
            "table", PROXY_TABLE, "0.0.0.0/0", "via", NODE_INBOUND_IP, "dev", POD_INBOUND_TUNNEL
        ),
        _route("table", OUTBOUND_TABLE, host, "dev", ZTUNNEL_DEV, "scope", "link"),
        _route("table", PROXY_TABLE, host, "dev", ZTUNNEL_DEV, "scope", "link"),
    ]


def local_hbone_rule(pod_ip: str) -> IpCommand:
    """ztunnel netns: its HBONE to this enrolled pod of its node goes to its own 15008."""
    to = ("to", f"{pod_ip}/32", "ipproto", "tcp", "dport", str(HBONE_PORT))
    return _rule("priority", LOCAL_HBONE_RULE_PRIORITY, *to, "lookup", INBOUND_TABLE)


def ztunnel_tunnels(facts: NodeFacts) -> list[Tunnel]:
    ends = (facts.ztunnel_ip, facts.host_ip, ZTUNNEL_DEV)
    return [
        Tunnel(POD_INBOUND_TUNNEL, INBOUND_VNI, ZTUNNEL_INBOUND_IP, NODE_INBOUND_IP, *ends),
        Tunnel(POD_OUTBOUND_TUNNEL, OUTBOUND_VNI, ZTUNNEL_OUTBOUND_IP, NODE_OUTBOUND_IP, *ends),
    ]


def ztunnel_sysctls() -> dict[str, int]:
    values = {"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0}
    for dev in (ZTUNNEL_DEV, POD_INBOUND_TUNNEL, POD_OUTBOUND_TUNNEL):
        values[f"net.ipv4.conf.{dev}.rp_filter"] = 0
    return values


# ---------------------------------------------------------------- reading back


def expected_node_rules(facts: NodeFacts) -> RuleMap:
    return by_chain(node_iptables_rules(facts))


def installed_node_rules(netns: CommandRunner) -> RuleMap:
    return installed_iptables_rules(netns, NODE_CHAINS)


def expected_ztunnel_rules(facts: NodeFacts) -> RuleMap:
    return by_chain(ztunnel_iptables_rules(facts))


def installed_ztunnel_rules(netns: CommandRunner) -> RuleMap:
    rules = installed_iptables_rules(netns, ("PREROUTING",))
    return {key: specs for key, specs in rules.items() if key[0] == "mangle"}


def normalize_ip_output(text: str) -> list[str]:
    """`ip rule` / `ip route` lines with whitespace collapsed (tabs after priorities)."""
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def installed_routing(
    netns: CommandRunner, priorities: Sequence[str], tables: Sequence[str] = TABLES
) -> dict[str, list[str]]:
    """`rules` (the given priorities) and each table's routes, as `ip` prints them."""
    rules = normalize_ip_output(netns.run(["ip", "-4", "rule", "show"]).stdout)
    found = {"rules": [r for r in rules if r.split(":")[0] in priorities]}
    for table in tables:
        shown = netns.run(["ip", "-4", "route", "show", "table", table], check=False).stdout
        found[f"table {table}"] = normalize_ip_output(shown)
    return found


def expected_node_routing(facts: NodeFacts, enrolled: Sequence[str]) -> dict[str, list[str]]:
    """What `installed_routing(node, NODE_RULE_PRIORITIES)` shows with `enrolled` pod IPs."""
    zveth, zip_ = facts.ztunnel_veth, facts.ztunnel_ip
    link = f"{zip_} dev {zveth} scope link"
    pods = [
        f"{ip} via {ZTUNNEL_INBOUND_IP} dev {INBOUND_TUNNEL} src {facts.host_ip}"
        for ip in sorted(enrolled, key=_ip_key)
    ]
    return {
        "rules": [
            f"100: from all fwmark {SKIP_MARK} goto 32766",
            f"101: from all fwmark {OUTBOUND_MARK} lookup {OUTBOUND_TABLE}",
            f"102: from all fwmark {PROXY_RETURN_MARK} lookup {PROXY_TABLE}",
            f"103: from all lookup {INBOUND_TABLE}",
        ],
        f"table {INBOUND_TABLE}": sorted([*pods, link], key=_route_key),
        f"table {OUTBOUND_TABLE}": [
            f"default via {ZTUNNEL_OUTBOUND_IP} dev {OUTBOUND_TUNNEL}",
            link,
        ],
        f"table {PROXY_TABLE}": [f"default via {zip_} dev {zveth} onlink", link],
    }


def _ip_key(ip: str) -> tuple[int, ...]:
    return tuple(int(part) for part in ip.split("."))


def _route_key(line: str) -> tuple[int, ...]:
    return _ip_key(line.split()[0])


def installed_ipset(netns: CommandRunner) -> list[str]:
    """The member IPs of the ipset (empty if it does not exist)."""
    done = netns.run(["ipset", "list", IPSET], check=False)
    if done.returncode != 0:
        return []
    members = done.stdout.split("Members:", 1)[-1]
    return sorted((line.split()[0] for line in members.splitlines() if line.strip()), key=_ip_key)


# ---------------------------------------------------------------- install / remove


def install_node_rules(netns: CommandRunner, facts: NodeFacts) -> None:
    """Chains, ipset and the mangle/nat/filter rules (before the tunnels, as Istio does)."""
    uninstall_node_rules(netns)
    netns.run(ipset_create())
    netns.run(["iptables-restore", "--noflush"], input=render_node_iptables(facts))


def install_node_routing(netns: CommandRunner, facts: NodeFacts) -> None:
    """Route tables and ip rules; needs the tunnels up."""
    for command in node_routing(facts):
        netns.run(command.argv("add"))


def uninstall_node_rules(netns: CommandRunner) -> None:
    """Remove what the node side added (tunnels are links: deleted by the caller)."""
    remove_iptables_chains(netns, NODE_CHAINS)
    for priority in NODE_RULE_PRIORITIES:
        while netns.run(["ip", "rule", "del", "priority", priority], check=False).returncode == 0:
            pass
    for table in TABLES:
        netns.run(["ip", "route", "flush", "table", table], check=False)
    netns.run(["ipset", "destroy", IPSET], check=False)


def install_ztunnel_rules(netns: CommandRunner, facts: NodeFacts) -> None:
    """TPROXY rules and routing inside the ztunnel pod (needs its tunnel ends up)."""
    lines = ["*mangle"]
    lines += [f"-A {rule.chain} {rule.spec}" for rule in ztunnel_iptables_rules(facts)]
    netns.run(["iptables-restore", "--noflush"], input="\n".join([*lines, "COMMIT", ""]))
    for command in ztunnel_routing(facts):
        netns.run(command.argv("add"))


def enroll(node: CommandRunner, ztunnel: CommandRunner, pod_ip: str, host_ip: str) -> None:
    node.run(ipset_member("add", pod_ip))
    node.run(pod_route(pod_ip, host_ip).argv("add"))
    ztunnel.run(local_hbone_rule(pod_ip).argv("add"))


def unenroll(node: CommandRunner, ztunnel: CommandRunner, pod_ip: str, host_ip: str) -> None:
    ztunnel.run(local_hbone_rule(pod_ip).argv("del"), check=False)
    node.run(pod_route(pod_ip, host_ip).argv("del"), check=False)
    node.run(ipset_member("del", pod_ip))
