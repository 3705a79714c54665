"""Pod-netns capture rules of Istio's ambient "inpod" mode (docs/architecture.md).

Three rule sets, each exactly as Istio's CNI agent writes them into a pod's netns:
- iptables, REDIRECT variant (Istio 1.24+, the default),
- iptables, TPROXY variant (Istio 1.21-1.23: inbound via mangle TPROXY),
- nftables (Istio 1.28 native backend, tables `inet istio-ambient-*`).
All share the policy routing that lets TPROXY'd / connmarked packets reach local sockets.

The rules are written in the canonical form that `iptables-save` and `nft list ruleset`
print, so that a rule set read back from a namespace compares equal to the reference.
All three capture the pod's DNS to ztunnel's DNS proxy on 15053 (docs/architecture.md) as
istio-cni does by default: REDIRECT and nftables as Istio 1.24+ (UDP and TCP 53, ztunnel's
own marked queries exempt and put in conntrack zone 1 by raw-table rules so they never
collide with the app's), TPROXY as Istio 1.21-1.23 (UDP 53 only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from testbed.netlab.host import CommandRunner
from testbed.redirect.rules import (
    ROUTE_TABLE,
    RULE_PRIORITY,
    TPROXY_MARK,
    Rule,
    RuleMap,
    by_chain,
    installed_iptables_rules,
    policy_routes,
    remove_iptables_chains,
    restore_script,
)

Variant = Literal["redirect", "tproxy"]
Backend = Literal["iptables", "nftables"]

HOST_PROBE_IP = "169.254.7.127"
INPOD_MARK = "0x539/0xfff"  # SO_MARK on every ztunnel socket inside the pod (1337)
OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
INBOUND_HBONE_PORT = 15008
DNS_CAPTURE_PORT = 15053

PRERT = "ISTIO_PRERT"
OUTPUT = "ISTIO_OUTPUT"
INPOD_CHAINS = (PRERT, OUTPUT)
_NFT_TABLES = ("istio-ambient-nat", "istio-ambient-mangle", "istio-ambient-raw")

# ---------------------------------------------------------------- iptables rule sets


def _jumps() -> list[Rule]:
    # Jumps from the built-in chains into Istio's own chains keep cleanup simple.
    return [
        Rule("mangle", "PREROUTING", f"-j {PRERT}"),
        Rule("mangle", "OUTPUT", f"-j {OUTPUT}"),
        Rule("nat", "OUTPUT", f"-j {OUTPUT}"),
    ]


def _dns_capture() -> list[Rule]:
    """Istio 1.24+: UDP and TCP 53 to 15053 except ztunnel's own (marked) queries, whose
    packets and the replies to them get conntrack zone 1."""
    not_inpod = f"-m mark ! --mark {INPOD_MARK}"
    return [
        Rule(
            "nat",
            OUTPUT,
            f"! -o lo -p udp {not_inpod} -m udp --dport 53"
            f" -j REDIRECT --to-ports {DNS_CAPTURE_PORT}",
        ),
        Rule(
            "nat",
            OUTPUT,
            f"! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 {not_inpod}"
            f" -j REDIRECT --to-ports {DNS_CAPTURE_PORT}",
        ),
        Rule("raw", "PREROUTING", f"-j {PRERT}"),
        Rule("raw", "OUTPUT", f"-j {OUTPUT}"),
        Rule("raw", OUTPUT, f"-p udp -m mark --mark {INPOD_MARK} -m udp --dport 53 -j CT --zone 1"),
        Rule(
            "raw", PRERT, f"-p udp -m mark ! --mark {INPOD_MARK} -m udp --sport 53 -j CT --zone 1"
        ),
    ]


def _dns_capture_udp_only() -> list[Rule]:
    """Istio 1.21-1.23 (the TPROXY era): UDP 53 only, no exemption, no conntrack zones."""
    return [
        Rule(
            "nat",
            OUTPUT,
            f"! -o lo -p udp -m udp --dport 53 -j REDIRECT --to-ports {DNS_CAPTURE_PORT}",
        )
    ]


def _nat_output(probe: str, dns: list[Rule]) -> list[Rule]:
    not_inpod = f"-m mark ! --mark {INPOD_MARK}"
    return [
        Rule("nat", OUTPUT, f"-d {probe}/32 -p tcp -m tcp -j ACCEPT"),
        *dns,
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
        *_nat_output(probe, _dns_capture()),
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
        *_nat_output(probe, _dns_capture_udp_only()),
    ]


def iptables_rules(variant: Variant, *, host_probe_ip: str = HOST_PROBE_IP) -> list[Rule]:
    if variant == "redirect":
        return _redirect_variant(host_probe_ip)
    if variant == "tproxy":
        return _tproxy_variant(host_probe_ip)
    raise ValueError(f"unknown inpod variant {variant!r}")


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
    NftChain("istio-ambient-raw", "prerouting", "type filter hook prerouting priority raw;"),
    NftChain("istio-ambient-raw", "output", "type filter hook output priority raw;"),
)
_MARK_MASK = "meta mark & 0x00000fff"


def nftables_rules(*, host_probe_ip: str = HOST_PROBE_IP) -> list[Rule]:
    """Istio 1.28's nftables rules (IPv4 part), in `nft list ruleset` spelling."""
    nat, mangle, raw = _NFT_TABLES
    not_inpod = f"{_MARK_MASK} != 0x00000539"
    return [
        Rule(nat, "output", "jump istio-output"),
        Rule(nat, "prerouting", "jump istio-prerouting"),
        Rule(nat, "istio-prerouting", f"meta l4proto tcp ip saddr {host_probe_ip} counter accept"),
        Rule(nat, "istio-output", f"meta l4proto tcp ip daddr {host_probe_ip} counter accept"),
        Rule(
            nat,
            "istio-output",
            f'oifname != "lo" {not_inpod} udp dport 53 counter redirect to :{DNS_CAPTURE_PORT}',
        ),
        Rule(
            nat,
            "istio-output",
            f"ip daddr != 127.0.0.1 tcp dport 53 {not_inpod}"
            f" counter redirect to :{DNS_CAPTURE_PORT}",
        ),
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
        Rule(raw, "prerouting", "jump istio-prerouting"),
        Rule(raw, "output", "jump istio-output"),
        Rule(raw, "istio-output", f"udp dport 53 {_MARK_MASK} == 0x00000539 counter ct zone set 1"),
        Rule(raw, "istio-prerouting", f"udp sport 53 {not_inpod} counter ct zone set 1"),
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
