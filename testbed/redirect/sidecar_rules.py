"""Pod-netns capture rules of Istio's sidecar mode (istio-iptables defaults, docs/architecture.md).

Inbound TCP goes to the sidecar's 15006 (except 15008 and the proxy's own 15020/15021/
15090), outbound TCP to 15001. The proxy's own traffic is told apart by its owner uid/gid
(1337, as istio-proxy runs) or, where the testbed runs the proxy as root like the apps,
by the SO_MARK its sockets carry. Traffic the proxy sends to the app comes from
127.0.0.6 over lo and is let through. Rules are written as `iptables-save` prints them.

DNS capture (istio-iptables `--redirect-dns`, given the pod's nameservers): TCP and UDP 53
to those servers go to the proxy's DNS listener on 15053 (chain ISTIO_OUTPUT_DNS), and raw
rules give the proxy's upstream queries conntrack zone 1 and the app's zone 2. Istio also
then sends all of OUTPUT (not only TCP) through ISTIO_OUTPUT. Not modelled: Istio's
`! --dport 53` refinements of the lo rules, which matter only for a nameserver on lo.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from testbed.netlab.host import CommandRunner
from testbed.redirect.rules import (
    Rule,
    RuleMap,
    by_chain,
    installed_iptables_rules,
    remove_iptables_chains,
    restore_script,
)

Exempt = Literal["uid", "mark"]

PROXY_UID = 1337
PROXY_MARK = "0x539/0xfff"
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
INBOUND_SKIPPED_PORTS = (15008, 15090, 15021, 15020)  # HBONE, Envoy stats, health, agent
INBOUND_PASSTHROUGH_SOURCE = "127.0.0.6"
DNS_PORT = 15053

INBOUND, IN_REDIRECT = "ISTIO_INBOUND", "ISTIO_IN_REDIRECT"
OUTPUT, REDIRECT = "ISTIO_OUTPUT", "ISTIO_REDIRECT"
OUTPUT_DNS = "ISTIO_OUTPUT_DNS"
SIDECAR_CHAINS = (INBOUND, IN_REDIRECT, OUTPUT, REDIRECT, OUTPUT_DNS)


def _proxy_matches(exempt: Exempt, uid: int) -> list[tuple[str, str]]:
    """(match, negated match) pairs identifying the proxy's own sockets."""
    if exempt == "uid":
        return [
            (f"-m owner --uid-owner {uid}", f"-m owner ! --uid-owner {uid}"),
            (f"-m owner --gid-owner {uid}", f"-m owner ! --gid-owner {uid}"),
        ]
    if exempt == "mark":
        return [(f"-m mark --mark {PROXY_MARK}", f"-m mark ! --mark {PROXY_MARK}")]
    raise ValueError(f"unknown proxy exemption {exempt!r}")


def _dns_rules(exempt: Exempt, uid: int, servers: Sequence[str]) -> list[Rule]:
    """ISTIO_OUTPUT_DNS in nat and raw, in the order istio-iptables writes them."""
    matches = [match for match, _ in _proxy_matches(exempt, uid)]
    nat = [
        *(
            Rule(
                "nat",
                OUTPUT_DNS,
                f"-d {ip}/32 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports {DNS_PORT}",
            )
            for ip in servers
        ),
        *(Rule("nat", OUTPUT_DNS, f"-p udp -m udp --dport 53 {m} -j RETURN") for m in matches),
        *(
            Rule(
                "nat",
                OUTPUT_DNS,
                f"-d {ip}/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports {DNS_PORT}",
            )
            for ip in servers
        ),
    ]
    raw = [Rule("raw", "OUTPUT", f"-j {OUTPUT_DNS}")]
    for m in matches:
        raw += [
            Rule("raw", OUTPUT_DNS, f"-p udp -m udp --dport 53 {m} -j CT --zone 1"),
            Rule("raw", OUTPUT_DNS, f"-p udp -m udp --sport {DNS_PORT} {m} -j CT --zone 2"),
        ]
    raw.append(Rule("raw", "PREROUTING", f"-j {INBOUND}"))
    for ip in servers:
        raw += [
            Rule("raw", OUTPUT_DNS, f"-d {ip}/32 -p udp -m udp --dport 53 -j CT --zone 2"),
            Rule("raw", INBOUND, f"-s {ip}/32 -p udp -m udp --sport 53 -j CT --zone 1"),
        ]
    return nat + raw


def _output_rules(exempt: Exempt, uid: int, dns: bool) -> list[Rule]:
    rules = [Rule("nat", OUTPUT, f"-s {INBOUND_PASSTHROUGH_SOURCE}/32 -o lo -j RETURN")]
    for match, negated in _proxy_matches(exempt, uid):
        rules += [
            # the proxy calling its own pod's IP (app -> VIP -> same pod) goes inbound
            Rule("nat", OUTPUT, f"! -d 127.0.0.1/32 -o lo {match} -j {IN_REDIRECT}"),
            Rule("nat", OUTPUT, f"-o lo {negated} -j RETURN"),
            Rule("nat", OUTPUT, f"{match} -j RETURN"),
        ]
    if dns:
        rules.append(Rule("nat", OUTPUT, f"-j {OUTPUT_DNS}"))
    return [
        *rules,
        Rule("nat", OUTPUT, "-d 127.0.0.1/32 -j RETURN"),
        Rule("nat", OUTPUT, f"-j {REDIRECT}"),
    ]


def sidecar_rules(
    exempt: Exempt = "uid", *, proxy_uid: int = PROXY_UID, dns_servers: Sequence[str] = ()
) -> list[Rule]:
    """The rule set; with `dns_servers` (the pod's nameservers) DNS is captured too."""
    skipped = [
        Rule("nat", INBOUND, f"-p tcp -m tcp --dport {port} -j RETURN")
        for port in INBOUND_SKIPPED_PORTS
    ]
    return [
        Rule("nat", "PREROUTING", f"-p tcp -j {INBOUND}"),
        Rule("nat", "OUTPUT", f"-j {OUTPUT}" if dns_servers else f"-p tcp -j {OUTPUT}"),
        *skipped,
        Rule("nat", INBOUND, f"-p tcp -j {IN_REDIRECT}"),
        Rule("nat", IN_REDIRECT, f"-p tcp -j REDIRECT --to-ports {INBOUND_PORT}"),
        *_output_rules(exempt, proxy_uid, bool(dns_servers)),
        Rule("nat", REDIRECT, f"-p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}"),
        *(_dns_rules(exempt, proxy_uid, dns_servers) if dns_servers else []),
    ]


def render_sidecar(
    exempt: Exempt = "uid", *, proxy_uid: int = PROXY_UID, dns_servers: Sequence[str] = ()
) -> str:
    """The rule set as `iptables-restore --noflush` input."""
    return restore_script(sidecar_rules(exempt, proxy_uid=proxy_uid, dns_servers=dns_servers))


def expected_rules(
    exempt: Exempt = "uid", *, proxy_uid: int = PROXY_UID, dns_servers: Sequence[str] = ()
) -> RuleMap:
    return by_chain(sidecar_rules(exempt, proxy_uid=proxy_uid, dns_servers=dns_servers))


def installed_rules(netns: CommandRunner) -> RuleMap:
    return installed_iptables_rules(netns, SIDECAR_CHAINS)


def install(
    netns: CommandRunner,
    exempt: Exempt = "uid",
    *,
    proxy_uid: int = PROXY_UID,
    dns_servers: Sequence[str] = (),
) -> None:
    """Apply the sidecar capture rules in the namespace, replacing earlier ones."""
    text = render_sidecar(exempt, proxy_uid=proxy_uid, dns_servers=dns_servers)
    uninstall(netns)
    netns.run(["iptables-restore", "--noflush"], input=text)


def uninstall(netns: CommandRunner) -> None:
    remove_iptables_chains(netns, SIDECAR_CHAINS)
