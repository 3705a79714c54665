"""Netfilter rule counters: read from `iptables-save -c` and `nft -j list ruleset`, diffed.

A rule "matched for the connection" when its packet counter grew while the connection ran.
Counters are per rule, not per flow: anything else crossing the same rule at the same time
(another trace, background traffic) is counted too; the walk says so in its evidence.
Plain jumps into a chain (`-j CHAIN` with no match) match every packet of their hook and
say nothing about this connection, so they are left out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

HOOK_ORDER = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
TABLE_ORDER = ("raw", "mangle", "nat", "filter", "security")
# iptables-nft keeps its tables as nft tables of these names; they are read via iptables-save
_XTABLES = frozenset({"filter", "nat", "mangle", "raw", "security"})
_NFT_HOOKS = {
    "prerouting": "PREROUTING",
    "input": "INPUT",
    "forward": "FORWARD",
    "output": "OUTPUT",
    "postrouting": "POSTROUTING",
}
_COUNTER_LINE = re.compile(r"^\[(\d+):(\d+)\] -A (\S+) (.*)$")
_PLAIN_JUMP = re.compile(r"^-j [A-Za-z0-9_.-]+$")
_BUILTIN = frozenset(HOOK_ORDER)
_ARROWS = re.compile(r"^(REDIRECT|TPROXY) --(?:to-ports|on-port) ")


@dataclass(frozen=True)
class RuleCount:
    """One rule with its counters; `key` identifies it across two snapshots."""

    backend: str  # "iptables" | "nft"
    table: str  # iptables table, or "<family> <name>" for nft
    chain: str
    position: int  # 0-based position in its chain
    spec: str
    packets: int
    bytes: int
    hook: str  # the netfilter hook the chain is reached from (best effort), "" unknown
    handle: int | None = None  # nft rule handle (nft-native rules)

    @property
    def key(self) -> tuple[str, str, str, int, str]:
        return (self.backend, self.table, self.chain, self.position, self.spec)


@dataclass(frozen=True)
class RuleHit:
    rule: RuleCount
    packets: int
    bytes: int

    @property
    def target(self) -> str:
        """What the rule did: iptables' `-j X ...` part, or nft's verdict statement."""
        spec = self.rule.spec
        if self.rule.backend == "iptables":
            action = spec.partition("-j ")[2] or spec
            return _ARROWS.sub(r"\1 -> ", action)
        return _nft_action(spec)


def _nft_action(spec: str) -> str:
    for word in (
        "redirect",
        "dnat",
        "snat",
        "masquerade",
        "tproxy",
        "meta mark set",
        "ct mark set",
        "accept",
        "drop",
        "return",
        "jump",
        "goto",
    ):
        index = spec.find(word)
        if index >= 0:
            return spec[index:]
    return spec


def parse_iptables_save(text: str) -> list[RuleCount]:
    """Rules with counters from `iptables-save -c`."""
    rules: list[RuleCount] = []
    table = ""
    positions: dict[tuple[str, str], int] = {}
    jumps: list[tuple[str, str, str]] = []  # (table, from chain, to chain)
    raw: list[tuple[str, str, str, int, int]] = []
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        match = _COUNTER_LINE.match(line)
        if not match:
            continue
        packets, size, chain, spec = match.groups()
        raw.append((table, chain, spec, int(packets), int(size)))
        target = spec.rpartition("-j ")[2].split(" ")[0] if "-j " in spec else ""
        jumps.append((table, chain, target))
    hooks = _hooks_of(jumps)
    for table, chain, spec, packets, size in raw:
        position = positions.get((table, chain), 0)
        positions[(table, chain)] = position + 1
        hook = chain if chain in _BUILTIN else hooks.get((table, chain), "")
        rules.append(RuleCount("iptables", table, chain, position, spec, packets, size, hook))
    return rules


def _hooks_of(jumps: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str], str]:
    """User chain -> the built-in chain (hook) it is first reached from."""
    parents: dict[tuple[str, str], str] = {}
    for t, frm, to in jumps:  # the first jump in (PREROUTING before OUTPUT in saves)
        if to and to not in _BUILTIN:
            parents.setdefault((t, to), frm)
    hooks: dict[tuple[str, str], str] = {}
    for (table, chain), _ in parents.items():
        seen, current = set(), chain
        while (table, current) in parents and current not in seen:
            seen.add(current)
            current = parents[(table, current)]
        if current in _BUILTIN:
            hooks[(table, chain)] = current
    return hooks


def parse_nft_json(text: str) -> list[RuleCount]:
    """Rules with a `counter` statement from `nft -j list ruleset`, except the tables of
    iptables-nft (read through iptables-save, which prints them in iptables' own syntax)."""
    if not text.strip():
        return []
    items = json.loads(text).get("nftables", [])
    hooks: dict[tuple[str, str, str], str] = {}
    for item in items:
        chain = item.get("chain")
        if chain and "hook" in chain:
            hooks[(chain["family"], chain["table"], chain["name"])] = _NFT_HOOKS.get(
                chain["hook"], chain["hook"].upper()
            )
    jumps: list[tuple[str, str, str]] = []
    rules: list[dict[str, object]] = [i["rule"] for i in items if "rule" in i]
    for rule in rules:
        for target in _nft_jump_targets(rule):
            jumps.append((f"{rule['family']} {rule['table']}", str(rule["chain"]), target))
    found: list[RuleCount] = []
    positions: dict[tuple[str, str], int] = {}
    for rule in rules:
        family, table, chain = str(rule["family"]), str(rule["table"]), str(rule["chain"])
        if family in ("ip", "ip6") and table in _XTABLES:
            continue
        name = f"{family} {table}"
        position = positions.get((name, chain), 0)
        positions[(name, chain)] = position + 1
        counter = _nft_counter(rule)
        if counter is None:
            continue
        hook = hooks.get((family, table, chain)) or _nft_hook_via(name, chain, jumps, hooks)
        spec = nft_rule_text(rule)
        handle = rule.get("handle")
        found.append(
            RuleCount(
                "nft",
                name,
                chain,
                position,
                spec,
                *counter,
                hook,
                handle if isinstance(handle, int) else None,
            )
        )
    return found


def _nft_jump_targets(rule: dict[str, object]) -> list[str]:
    targets = []
    for statement in rule.get("expr", []):  # type: ignore[attr-defined]
        for verb in ("jump", "goto"):
            if isinstance(statement, dict) and verb in statement:
                targets.append(str(statement[verb]["target"]))
    return targets


def _nft_hook_via(
    name: str, chain: str, jumps: list[tuple[str, str, str]], hooks: dict[tuple[str, str, str], str]
) -> str:
    family, _, table = name.partition(" ")
    for t, frm, to in jumps:
        if t == name and to == chain:
            return hooks.get((family, table, frm), "")
    return ""


def _nft_counter(rule: dict[str, object]) -> tuple[int, int] | None:
    for statement in rule.get("expr", []):  # type: ignore[attr-defined]
        if isinstance(statement, dict) and "counter" in statement:
            counter = statement["counter"]
            if isinstance(counter, dict) and "packets" in counter:
                return int(counter["packets"]), int(counter["bytes"])
    return None


def nft_rule_text(rule: dict[str, object]) -> str:
    """A short nft-like text of a JSON rule (match and verdict words, no counters)."""
    words: list[str] = []
    for statement in rule.get("expr", []):  # type: ignore[attr-defined]
        if not isinstance(statement, dict) or "counter" in statement:
            continue
        words.append(_nft_statement_text(statement))
    return " ".join(w for w in words if w)


def _nft_statement_text(statement: dict[str, object]) -> str:
    (verb, body), *_ = statement.items()
    if verb == "match" and isinstance(body, dict):
        op = body.get("op", "==")
        return f"{_nft_value(body.get('left'))} {op} {_nft_value(body.get('right'))}"
    if verb in ("jump", "goto") and isinstance(body, dict):
        return f"{verb} {body.get('target')}"
    if verb == "redirect" and isinstance(body, dict):
        return f"redirect to :{body.get('port')}"
    if verb == "mangle" and isinstance(body, dict):
        return f"{_nft_value(body.get('key'))} set {_nft_value(body.get('value'))}"
    if body is None:
        return verb
    return f"{verb} {_nft_value(body)}"


def _nft_value(value: object) -> str:
    if isinstance(value, dict):
        if "payload" in value:
            payload = value["payload"]
            return f"{payload.get('protocol')} {payload.get('field')}"
        if "meta" in value:
            return f"meta {value['meta'].get('key')}"
        if "ct" in value:
            return f"ct {value['ct'].get('key')}"
        if "&" in value or "|" in value:
            (op, (left, right)), *_ = value.items()
            return f"{_nft_value(left)} {op} {_nft_value(right)}"
        if "prefix" in value:
            return f"{value['prefix'].get('addr')}/{value['prefix'].get('len')}"
        return json.dumps(value, sort_keys=True)
    if isinstance(value, int) and value > 255:
        return hex(value) if value & 0xF00 else str(value)
    return str(value)


def rule_hits(before: Iterable[RuleCount], after: Iterable[RuleCount]) -> list[RuleHit]:
    """Rules whose packet counter grew, minus the plain jumps; new rules count from zero."""
    old = {rule.key: rule for rule in before}
    hits: list[RuleHit] = []
    for rule in after:
        prior = old.get(rule.key)
        packets = rule.packets - (prior.packets if prior else 0)
        size = rule.bytes - (prior.bytes if prior else 0)
        if packets > 0 and not _PLAIN_JUMP.match(rule.spec):
            hits.append(RuleHit(rule, packets, size))
    return hits


def missing_rules(before: Iterable[RuleCount], after: Iterable[RuleCount]) -> list[RuleCount]:
    """Rules present before the connection and gone after it (someone removed them)."""
    now = {(r.backend, r.table, r.chain, r.spec) for r in after}
    return [r for r in before if (r.backend, r.table, r.chain, r.spec) not in now]


def hit_order(hit: RuleHit) -> tuple[int, int, str, int]:
    """Hook order, then table order, then chain and position: the order packets meet them."""
    rule = hit.rule
    hook = HOOK_ORDER.index(rule.hook) if rule.hook in HOOK_ORDER else len(HOOK_ORDER)
    table = rule.table.split()[-1]
    rank = TABLE_ORDER.index(table) if table in TABLE_ORDER else 1
    return (hook, rank, rule.chain, rule.position)
