"""Pod-netns capture rules of Istio's ambient "inpod" mode (DESIGN.md 4.1).

Three rule sets, each exactly as Istio's CNI agent writes them into a pod's netns:
- iptables, REDIRECT variant (Istio 1.24+, the default),
- iptables, TPROXY variant (Istio 1.21-1.23: inbound via mangle TPROXY),
- nftables (Istio 1.28 native backend, tables `inet istio-ambient-*`).
All share the policy routing that lets TPROXY'd / connmarked packets reach local sockets.

The rules are written in the canonical form that `iptables-save` and `nft list ruleset`
print, so that a rule set read back from a namespace compares equal to the reference.
DNS capture (port 15053) is not modelled; the testbed has no DNS proxy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from testbed.netlab.host import CommandRunner

Variant = Literal["redirect", "tproxy"]
Backend = Literal["iptables", "nftables"]

HOST_PROBE_IP = "169.254.7.127"
INPOD_MARK = "0x539/0xfff"  # SO_MARK on every ztunnel socket inside the pod (1337)
TPROXY_MARK = "0x111/0xfff"  # set on captured / ztunnel connections, routed via table 100
ROUTE_TABLE = "100"
RULE_PRIORITY = "32764"
OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
INBOUND_HBONE_PORT = 15008

PRERT = "ISTIO_PRERT"
OUTPUT = "ISTIO_OUTPUT"
INPOD_CHAINS = (PRERT, OUTPUT)
_BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
_NFT_TABLES = ("istio-ambient-nat", "istio-ambient-mangle")

RuleMap = dict[tuple[str, str], list[str]]
"""(table, chain) -> the chain's rule texts in order; the comparable form of a rule set."""


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    spec: str


# ---------------------------------------------------------------- iptables rule sets


def _jumps() -> list[Rule]:
    # Jumps from the built-in chains into Istio's own chains keep cleanup simple.
    return [
        Rule("mangle", "PREROUTING", f"-j {PRERT}"),
        Rule("mangle", "OUTPUT", f"-j {OUTPUT}"),
        Rule("nat", "OUTPUT", f"-j {OUTPUT}"),
    ]


def _nat_output(probe: str) -> list[Rule]:
    not_inpod = f"-m mark ! --mark {INPOD_MARK}"
    return [
        Rule("nat", OUTPUT, f"-d {probe}/32 -p tcp -m tcp -j ACCEPT"),
        Rule("nat", OUTPUT, f"-p tcp -m mark --mark {TPROXY_MARK} -j ACCEPT"),
        # app -> own pod IP over lo must not loop through ztunnel
        Rule("nat", OUTPUT, "! -d 127.0.0.1/32 -o lo -j ACCEPT"),
        Rule(
            "nat",
            OUTPUT,
            f"! -d 127.0.0.1/32 -p tcp {not_inpod} -j REDIRECT --to-ports {OUTBOUND_PORT}",
        ),
    ]


_CONNMARK_FROM_MARK = f"-m mark --mark {INPOD_MARK} -j CONNMARK --set-xmark {TPROXY_MARK}"
_RESTORE_MARK = (
    f"-m connmark --mark {TPROXY_MARK} -j CONNMARK --restore-mark"
    " --nfmask 0xffffffff --ctmask 0xffffffff"
)


def _redirect_variant(probe: str) -> list[Rule]:
    not_inpod = f"-m mark ! --mark {INPOD_MARK}"
    return [
        *_jumps(),
        Rule("nat", "PREROUTING", f"-j {PRERT}"),
        Rule("mangle", PRERT, _CONNMARK_FROM_MARK),
        Rule("nat", PRERT, f"-s {probe}/32 -p tcp -m tcp -j ACCEPT"),
        Rule(
            "nat",
            PRERT,
            f"! -d 127.0.0.1/32 -p tcp -m tcp ! --dport {INBOUND_HBONE_PORT} {not_inpod}"
            f" -j REDIRECT --to-ports {INBOUND_PLAINTEXT_PORT}",
        ),
        Rule("mangle", OUTPUT, _RESTORE_MARK),
        *_nat_output(probe),
    ]


def _tproxy_variant(probe: str) -> list[Rule]:
    not_inpod = f"-m mark ! --mark {INPOD_MARK}"
    tproxy = "--on-ip 0.0.0.0 --tproxy-mark " + TPROXY_MARK
    return [
        *_jumps(),
        Rule("mangle", PRERT, _CONNMARK_FROM_MARK),
        Rule("mangle", PRERT, f"-s {probe}/32 -p tcp -m tcp -j ACCEPT"),
        Rule("mangle", PRERT, "! -d 127.0.0.1/32 -i lo -p tcp -j ACCEPT"),
        Rule(
            "mangle",
            PRERT,
            f"-p tcp -m tcp --dport {INBOUND_HBONE_PORT} {not_inpod}"
            f" -j TPROXY --on-port {INBOUND_HBONE_PORT} {tproxy}",
        ),
        # replies to the pod's own outbound connections must not be TPROXY'd
        Rule("mangle", PRERT, "-p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
        Rule(
            "mangle",
            PRERT,
            f"! -d 127.0.0.1/32 -p tcp {not_inpod}"
            f" -j TPROXY --on-port {INBOUND_PLAINTEXT_PORT} {tproxy}",
        ),
        Rule("mangle", OUTPUT, _RESTORE_MARK),
        *_nat_output(probe),
    ]


def iptables_rules(variant: Variant, *, host_probe_ip: str = HOST_PROBE_IP) -> list[Rule]:
    if variant == "redirect":
        return _redirect_variant(host_probe_ip)
    if variant == "tproxy":
        return _tproxy_variant(host_probe_ip)
    raise ValueError(f"unknown inpod variant {variant!r}")


def restore_script(rules: Sequence[Rule]) -> str:
    """`iptables-restore --noflush` input adding the rules (and declaring their chains)."""
    lines: list[str] = []
    for table in dict.fromkeys(rule.table for rule in rules):
        in_table = [rule for rule in rules if rule.table == table]
        lines.append(f"*{table}")
        own = dict.fromkeys(r.chain for r in in_table if r.chain not in _BUILTIN_CHAINS)
        lines += [f":{chain} - [0:0]" for chain in own]
        lines += [f"-A {rule.chain} {rule.spec}" for rule in in_table]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_iptables(variant: Variant, *, host_probe_ip: str = HOST_PROBE_IP) -> str:
    """The rule set as `iptables-restore --noflush` input."""
    return restore_script(iptables_rules(variant, host_probe_ip=host_probe_ip))


# ---------------------------------------------------------------- nftables rule set


@dataclass(frozen=True)
class NftChain:
    table: str
    name: str
    hook: str  # the base-chain spec as `nft list ruleset` prints it


_NFT_BASE_CHAINS = (
    NftChain("istio-ambient-nat", "prerouting", "type nat hook prerouting priority dstnat;"),
    NftChain("istio-ambient-nat", "output", "type nat hook output priority -100;"),
    NftChain("istio-ambient-mangle", "prerouting", "type filter hook prerouting priority mangle;"),
    NftChain("istio-ambient-mangle", "output", "type route hook output priority mangle;"),
)
_MARK_MASK = "meta mark & 0x00000fff"


def nftables_rules(*, host_probe_ip: str = HOST_PROBE_IP) -> list[Rule]:
    """Istio 1.28's nftables rules (IPv4 part), in `nft list ruleset` spelling."""
    nat, mangle = _NFT_TABLES
    not_inpod = f"{_MARK_MASK} != 0x00000539"
    return [
        Rule(nat, "output", "jump istio-output"),
        Rule(nat, "prerouting", "jump istio-prerouting"),
        Rule(nat, "istio-prerouting", f"meta l4proto tcp ip saddr {host_probe_ip} counter accept"),
        Rule(nat, "istio-output", f"meta l4proto tcp ip daddr {host_probe_ip} counter accept"),
        Rule(
            nat,
            "istio-prerouting",
            f"ip daddr != 127.0.0.1 tcp dport != {INBOUND_HBONE_PORT} {not_inpod}"
            f" counter redirect to :{INBOUND_PLAINTEXT_PORT}",
        ),
        Rule(nat, "istio-output", f"meta l4proto tcp {_MARK_MASK} == 0x00000111 counter accept"),
        Rule(nat, "istio-output", 'oifname "lo" ip daddr != 127.0.0.1 counter accept'),
        Rule(
            nat,
            "istio-output",
            f"meta l4proto tcp ip daddr != 127.0.0.1 {not_inpod}"
            f" counter redirect to :{OUTBOUND_PORT}",
        ),
        Rule(mangle, "prerouting", "jump istio-prerouting"),
        Rule(mangle, "output", "jump istio-output"),
        # Istio writes `ct mark & 0xfffff000 | 0x111`; nft folds it into this equal form.
        Rule(
            mangle,
            "istio-prerouting",
            f"{_MARK_MASK} == 0x00000539 counter ct mark set ct mark & 0xfffff111 | 0x00000111",
        ),
        Rule(
            mangle,
            "istio-output",
            "ct mark & 0x00000fff == 0x00000111 counter meta mark set ct mark",
        ),
    ]


def _nft_chain_decl(table: str, chain: str) -> str:
    base = {(c.table, c.name): c.hook for c in _NFT_BASE_CHAINS}.get((table, chain), "")
    body = f" {{ {base} policy accept; }}" if base else ""
    return f"add chain inet {table} {chain}{body}"


def render_nftables(*, host_probe_ip: str = HOST_PROBE_IP) -> str:
    """The rule set as `nft -f -` input; re-applying it replaces the tables' contents."""
    rules = nftables_rules(host_probe_ip=host_probe_ip)
    lines: list[str] = []
    for table in _NFT_TABLES:
        lines += [f"add table inet {table}", f"flush table inet {table}"]
        in_table = [rule for rule in rules if rule.table == table]
        chains = [c.name for c in _NFT_BASE_CHAINS if c.table == table]
        chains += [r.chain for r in in_table if r.chain.startswith("istio-")]
        lines += [_nft_chain_decl(table, chain) for chain in dict.fromkeys(chains)]
        lines += [f"add rule inet {table} {rule.chain} {rule.spec}" for rule in in_table]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- policy routing


@dataclass(frozen=True)
class IpCommand:
    """An `ip` command of the inpod policy routing, for adding or deleting."""

    kind: Literal["rule", "route"]
    args: tuple[str, ...]

    def argv(self, action: Literal["add", "del"]) -> list[str]:
        return ["ip", self.kind, action, *self.args]


def policy_routes() -> list[IpCommand]:
    """Packets marked 0x111 (TPROXY'd, or ztunnel's own connections) are delivered locally."""
    return [
        IpCommand("route", ("local", "0.0.0.0/0", "dev", "lo", "table", ROUTE_TABLE)),
        IpCommand("rule", ("fwmark", TPROXY_MARK, "pref", RULE_PRIORITY, "lookup", ROUTE_TABLE)),
    ]


# ---------------------------------------------------------------- reading rules back


def expected_rules(
    variant: Variant, backend: Backend, *, host_probe_ip: str = HOST_PROBE_IP
) -> RuleMap:
    """The reference rule set in the same shape as `installed_rules` returns."""
    if backend == "iptables":
        return by_chain(iptables_rules(variant, host_probe_ip=host_probe_ip))
    _require_redirect(variant)
    hooks = [Rule(c.table, c.name, c.hook + " policy accept;") for c in _NFT_BASE_CHAINS]
    return by_chain(hooks + nftables_rules(host_probe_ip=host_probe_ip))


def _require_redirect(variant: Variant) -> None:
    if variant != "redirect":
        raise ValueError("Istio's nftables backend has only the REDIRECT variant")


def by_chain(rules: Sequence[Rule]) -> RuleMap:
    grouped: RuleMap = {}
    for rule in rules:
        grouped.setdefault((rule.table, rule.chain), []).append(rule.spec)
    return grouped


def parse_iptables_save(text: str, chains: Sequence[str] = INPOD_CHAINS) -> list[Rule]:
    """The rules of `chains`, and the jumps into them, from `iptables-save` output."""
    rules: list[Rule] = []
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            if chain in chains or (chain in _BUILTIN_CHAINS and spec.split()[-1] in chains):
                rules.append(Rule(table, chain, spec))
    return rules


_COUNTER = re.compile(r"counter packets \d+ bytes \d+")


def parse_nft_ruleset(text: str) -> list[Rule]:
    """Rules of Istio's `inet istio-ambient-*` tables from `nft list ruleset` output.

    Counters are reduced to a bare `counter`; base-chain specs become the chain's first
    entry, so a changed hook or priority shows up as a difference too.
    """
    rules: list[Rule] = []
    table = chain = ""
    for raw in text.splitlines():
        line = _COUNTER.sub("counter", raw.strip())
        if line.startswith("table "):
            family_and_name = line.removeprefix("table ").removesuffix("{").split()
            table = family_and_name[1] if family_and_name[0] == "inet" else ""
        elif line.startswith("chain "):
            chain = line.split()[1]
        elif table.startswith("istio-ambient-") and line not in ("", "}"):
            rules.append(Rule(table, chain, line))
    return rules


def installed_rules(netns: CommandRunner, backend: Backend) -> RuleMap:
    if backend == "iptables":
        return installed_iptables_rules(netns, INPOD_CHAINS)
    return by_chain(parse_nft_ruleset(netns.run(["nft", "list", "ruleset"]).stdout))


def installed_iptables_rules(netns: CommandRunner, chains: Sequence[str]) -> RuleMap:
    return by_chain(parse_iptables_save(netns.run(["iptables-save"]).stdout, chains))


def installed_policy_routes(netns: CommandRunner) -> list[str]:
    """The inpod ip rule and table-100 routes present in the namespace (empty if none)."""
    rules = netns.run(["ip", "rule", "show", "pref", RULE_PRIORITY]).stdout.splitlines()
    routes = netns.run(["ip", "route", "show", "table", ROUTE_TABLE]).stdout.splitlines()
    return [line.strip() for line in rules + routes if line.strip()]


# ---------------------------------------------------------------- install / uninstall


def install(
    netns: CommandRunner, variant: Variant = "redirect", backend: Backend = "iptables"
) -> None:
    """Apply one rule set and the policy routing in the namespace, replacing any rules
    this module installed before (of any variant or backend); safe to repeat."""
    if backend == "nftables":
        _require_redirect(variant)
    uninstall(netns)
    if backend == "iptables":
        netns.run(["iptables-restore", "--noflush"], input=render_iptables(variant))
    else:
        netns.run(["nft", "-f", "-"], input=render_nftables())
    for command in policy_routes():
        netns.run(command.argv("add"))


def uninstall(netns: CommandRunner) -> None:
    """Remove everything `install` may have added, whatever the variant and backend."""
    remove_iptables_chains(netns, INPOD_CHAINS)
    # `add` first makes `delete` succeed whether or not the table exists
    tables = "".join(f"add table inet {t}\ndelete table inet {t}\n" for t in _NFT_TABLES)
    netns.run(["nft", "-f", "-"], input=tables)
    for command in reversed(policy_routes()):
        while netns.run(command.argv("del"), check=False).returncode == 0:
            pass  # repeated in case something added a duplicate


def remove_iptables_chains(netns: CommandRunner, chains: Sequence[str]) -> None:
    """Delete `chains` (in every table) and the jumps into them, if there are any."""
    script = removal_script(netns.run(["iptables-save"]).stdout, chains)
    if script:
        netns.run(["iptables-restore", "--noflush"], input=script)


def removal_script(saved: str, chains: Sequence[str] = INPOD_CHAINS) -> str:
    """iptables-restore input that removes `chains` (and the jumps into them) found in
    `iptables-save` output; empty if there is nothing to remove."""
    own = _declared_chains(saved, chains)
    jumps = [r for r in parse_iptables_save(saved, chains) if r.chain in _BUILTIN_CHAINS]
    lines: list[str] = []
    for table in dict.fromkeys(t for t, _ in own):
        in_table = [chain for t, chain in own if t == table]
        lines.append(f"*{table}")
        # declaring a chain under --noflush empties it, so it can then be deleted
        lines += [f":{chain} - [0:0]" for chain in in_table]
        lines += [f"-D {r.chain} {r.spec}" for r in jumps if r.table == table]
        lines += [f"-X {chain}" for chain in in_table]
        lines.append("COMMIT")
    return "".join(line + "\n" for line in lines)


def _declared_chains(saved: str, chains: Sequence[str]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":") and line[1:].split()[0] in chains:
            found.append((table, line[1:].split()[0]))
    return found
