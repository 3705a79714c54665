"""The rule types every mode's rules share: iptables rules and chains, `ip` commands, the
namespace they run in, and the local-delivery policy routing (mark 0x111 -> table 100).

A mode's own rule module (inpod_rules, legacy_rules, sidecar_rules) builds on these and
on nothing of another mode. Rules are written in the form `iptables-save` prints, so a rule
set read back from a namespace compares equal to the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from testbed.netlab.host import CommandRunner

BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
TPROXY_MARK = "0x111/0xfff"  # set on captured / proxy connections, routed via table 100
ROUTE_TABLE = "100"
RULE_PRIORITY = "32764"

RuleMap = dict[tuple[str, str], list[str]]
"""(table, chain) -> the chain's rule texts in order; the comparable form of a rule set."""


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    spec: str


@dataclass(frozen=True)
class IpCommand:
    """An `ip rule` or `ip route` command, for adding or deleting."""

    kind: Literal["rule", "route"]
    args: tuple[str, ...]

    def argv(self, action: Literal["add", "del"]) -> list[str]:
        return ["ip", self.kind, action, *self.args]


def policy_routes() -> list[IpCommand]:
    """Packets marked 0x111 (TPROXY'd, or a proxy's own connections) are delivered locally."""
    return [
        IpCommand("route", ("local", "0.0.0.0/0", "dev", "lo", "table", ROUTE_TABLE)),
        IpCommand("rule", ("fwmark", TPROXY_MARK, "pref", RULE_PRIORITY, "lookup", ROUTE_TABLE)),
    ]


def restore_script(rules: Sequence[Rule]) -> str:
    """`iptables-restore --noflush` input adding the rules (and declaring their chains)."""
    lines: list[str] = []
    for table in dict.fromkeys(rule.table for rule in rules):
        in_table = [rule for rule in rules if rule.table == table]
        lines.append(f"*{table}")
        own = dict.fromkeys(r.chain for r in in_table if r.chain not in BUILTIN_CHAINS)
        lines += [f":{chain} - [0:0]" for chain in own]
        lines += [f"-A {rule.chain} {rule.spec}" for rule in in_table]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def by_chain(rules: Sequence[Rule]) -> RuleMap:
    grouped: RuleMap = {}
    for rule in rules:
        grouped.setdefault((rule.table, rule.chain), []).append(rule.spec)
    return grouped


def parse_iptables_save(text: str, chains: Sequence[str]) -> list[Rule]:
    """The rules of `chains`, and the jumps into them, from `iptables-save` output."""
    rules: list[Rule] = []
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            if chain in chains or (chain in BUILTIN_CHAINS and spec.split()[-1] in chains):
                rules.append(Rule(table, chain, spec))
    return rules


def installed_iptables_rules(netns: CommandRunner, chains: Sequence[str]) -> RuleMap:
    return by_chain(parse_iptables_save(netns.run(["iptables-save"]).stdout, chains))


def remove_iptables_chains(netns: CommandRunner, chains: Sequence[str]) -> None:
    """Delete `chains` (in every table) and the jumps into them, if there are any."""
    script = removal_script(netns.run(["iptables-save"]).stdout, chains)
    if script:
        netns.run(["iptables-restore", "--noflush"], input=script)


def removal_script(saved: str, chains: Sequence[str]) -> str:
    """iptables-restore input that removes `chains` (and the jumps into them) found in
    `iptables-save` output; empty if there is nothing to remove."""
    own = _declared_chains(saved, chains)
    jumps = [r for r in parse_iptables_save(saved, chains) if r.chain in BUILTIN_CHAINS]
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
