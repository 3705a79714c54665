"""Legacy-mode rule rendering and read-back parsing, without any namespace."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from testbed.redirect import ModeError, create_mode
from testbed.redirect import legacy_rules as lr
from testbed.redirect.legacy import LegacyMode

FACTS = lr.NodeFacts("172.18.0.1", "10.244.0.5", "vp3", "vxlan")
GENEVE = lr.NodeFacts("172.18.0.1", "10.244.0.5", "vp3", "geneve")


class FakeNetns:
    """Answers `run` with canned output per command; records what was run."""

    def __init__(self, outputs: dict[str, str]) -> None:
        self.outputs = outputs
        self.ran: list[list[str]] = []

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = 60.0,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        self.ran.append(list(argv))
        key = " ".join(argv)
        return subprocess.CompletedProcess(list(argv), 0 if key in self.outputs else 1,
                                           self.outputs.get(key, ""), "")  # fmt: skip


def test_node_prerouting_follows_istio_order() -> None:
    specs = lr.expected_node_rules(FACTS)[("mangle", lr.PREROUTING)]
    assert len(specs) == 15
    assert specs[0] == "-i istioin -j MARK --set-xmark 0x200/0x200"
    assert specs[4] == "-p udp -m udp --dport 4789 -j RETURN"
    assert specs[7] == "! -i vp3 -m connmark --mark 0x210/0x210 -j MARK --set-xmark 0x40/0x40"
    assert specs[9] == "! -s 10.244.0.5/32 -i vp3 -j MARK --set-xmark 0x210/0x210"
    assert specs[-1] == (
        "-p tcp -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100"
    )


def test_tunnel_kind_only_changes_the_udp_port() -> None:
    vxlan, geneve = lr.node_iptables_rules(FACTS), lr.node_iptables_rules(GENEVE)
    changed = [(a.spec, b.spec) for a, b in zip(vxlan, geneve, strict=True) if a != b]
    assert changed == [
        ("-p udp -m udp --dport 4789 -j RETURN", "-p udp -m udp --dport 6081 -j RETURN")
    ]


def test_render_inserts_jumps_and_declares_every_chain() -> None:
    text = lr.render_node_iptables(FACTS)
    tables = text.split("COMMIT\n")
    mangle, nat, filter_ = tables[0], tables[1], tables[2]
    assert mangle.startswith("*mangle\n:ztunnel-PREROUTING - [0:0]\n")
    for builtin in ("PREROUTING", "POSTROUTING", "OUTPUT", "INPUT", "FORWARD"):
        assert f"-I {builtin} -j ztunnel-{builtin}\n" in mangle
    assert "-I PREROUTING -j ztunnel-PREROUTING\n" in nat
    assert "-A ztunnel-POSTROUTING -m mark --mark 0x100/0x100 -j ACCEPT\n" in nat
    assert "-I FORWARD -j ztunnel-FORWARD\n" in filter_
    assert "-A ztunnel-OUTPUT -s 172.18.0.1/32 -j MARK --set-xmark 0x220/0xffffffff" in mangle
    assert "-A ztunnel-FORWARD -m mark --mark 0x210/0x210 -j CONNMARK --save-mark" in mangle


def test_node_routing_has_rules_100_to_103() -> None:
    commands = [" ".join(c.argv("add")) for c in lr.node_routing(FACTS)]
    assert "ip rule add priority 100 fwmark 0x200/0x200 goto 32766" in commands
    assert "ip rule add priority 101 fwmark 0x100/0x100 lookup 101" in commands
    assert "ip rule add priority 102 fwmark 0x40/0x40 lookup 102" in commands
    assert "ip rule add priority 103 lookup 100" in commands
    assert "ip route add table 101 0.0.0.0/0 via 192.168.127.2 dev istioout" in commands
    assert "ip route add table 102 0.0.0.0/0 via 10.244.0.5 dev vp3 onlink" in commands
    # routes before the rules that use them
    assert commands.index("ip rule add priority 103 lookup 100") == len(commands) - 1


def test_pod_route_goes_through_istioin_from_the_host_ip() -> None:
    assert lr.pod_route("10.244.0.7", "172.18.0.1").argv("del") == [
        "ip", "route", "del", "table", "100", "10.244.0.7/32",
        "via", "192.168.126.2", "dev", "istioin", "src", "172.18.0.1",
    ]  # fmt: skip


def test_tunnel_ends_mirror_each_other() -> None:
    node = {t.vni: t for t in lr.node_tunnels(FACTS)}
    pod = {t.vni: t for t in lr.ztunnel_tunnels(FACTS)}
    assert set(node) == set(pod) == {1000, 1001}
    for vni in (1000, 1001):
        assert (node[vni].address, node[vni].peer_address) == (
            pod[vni].peer_address,
            pod[vni].address,
        )
        assert (node[vni].local, node[vni].remote) == (pod[vni].remote, pod[vni].local)
    assert node[1000].name == "istioin" and pod[1001].name == "pistioout"
    assert node[1000].underlay_dev == "vp3" and pod[1000].underlay_dev == "eth0"


def test_ztunnel_rules_tproxy_to_the_three_ports() -> None:
    specs = lr.expected_ztunnel_rules(FACTS)[("mangle", "PREROUTING")]
    assert specs == [
        "-i pistioin -p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 127.0.0.1"
        " --tproxy-mark 0x400/0xfff",
        "-i pistioout -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff",
        "-i pistioin -p tcp -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff",
        "! -d 10.244.0.5/32 -i eth0 -p tcp -j MARK --set-xmark 0x4d3/0xfff",
    ]


def test_sysctls_disable_rp_filter_and_accept_local() -> None:
    values = lr.node_sysctls(FACTS)
    assert values["net.ipv4.conf.all.rp_filter"] == 0
    for dev in ("vp3", "istioin", "istioout"):
        assert values[f"net.ipv4.conf.{dev}.rp_filter"] == 0
        assert values[f"net.ipv4.conf.{dev}.accept_local"] == 1


SAVED = """\
*mangle
:PREROUTING ACCEPT [0:0]
:ztunnel-PREROUTING - [0:0]
-A PREROUTING -j ztunnel-PREROUTING
-A PREROUTING -j KUBE-SOMETHING
-A ztunnel-PREROUTING -i istioin -j MARK --set-xmark 0x200/0x200
COMMIT
"""


def test_installed_rules_keep_only_ztunnel_chains_and_jumps() -> None:
    fake = FakeNetns({"iptables-save": SAVED})
    assert lr.installed_node_rules(fake) == {
        ("mangle", "PREROUTING"): ["-j ztunnel-PREROUTING"],
        ("mangle", lr.PREROUTING): ["-i istioin -j MARK --set-xmark 0x200/0x200"],
    }


def test_installed_routing_and_ipset_are_parsed() -> None:
    fake = FakeNetns(
        {
            "ip -4 rule show": "0:\tfrom all lookup local\n101:\tfrom all fwmark 0x100/0x100 "
            "lookup 101\n32766:\tfrom all lookup main\n",
            "ip -4 route show table 100": "10.244.0.9 via 192.168.126.2 dev istioin src 1.2.3.4 \n",
            "ipset list ztunnel-pods-ips": "Name: ztunnel-pods-ips\nMembers:\n10.244.0.9\n"
            "10.244.0.10\n",
        }
    )
    found = lr.installed_routing(fake, lr.NODE_RULE_PRIORITIES, tables=("100",))
    assert found == {
        "rules": ["101: from all fwmark 0x100/0x100 lookup 101"],
        "table 100": ["10.244.0.9 via 192.168.126.2 dev istioin src 1.2.3.4"],
    }
    assert lr.installed_ipset(fake) == ["10.244.0.9", "10.244.0.10"]
    assert lr.installed_ipset(FakeNetns({})) == []


def test_expected_routing_sorts_enrolled_pods_numerically() -> None:
    table = lr.expected_node_routing(FACTS, ["10.244.0.10", "10.244.0.9"])["table 100"]
    assert [line.split()[0] for line in table] == ["10.244.0.5", "10.244.0.9", "10.244.0.10"]


def test_enroll_and_unenroll_commands() -> None:
    fake, ztunnel = FakeNetns({}), FakeNetns({})
    lr.enroll(fake, ztunnel, "10.244.0.9", "172.18.0.1")
    lr.unenroll(fake, ztunnel, "10.244.0.9", "172.18.0.1")
    assert fake.ran[0] == ["ipset", "add", "ztunnel-pods-ips", "10.244.0.9", "-exist"]
    assert fake.ran[1][:4] == ["ip", "route", "add", "table"]
    assert fake.ran[2][:4] == ["ip", "route", "del", "table"]
    assert fake.ran[3] == ["ipset", "del", "ztunnel-pods-ips", "10.244.0.9", "-exist"]
    # only this enrolled pod's HBONE is taken by ztunnel's own 15008 (never a waypoint's)
    rule = ["priority", "20002", "to", "10.244.0.9/32", "ipproto", "tcp", "dport", "15008",
            "lookup", "100"]  # fmt: skip
    assert ztunnel.ran == [["ip", "rule", "add", *rule], ["ip", "rule", "del", *rule]]


def test_legacy_mode_takes_istio_1_20s_same_node_fast_path_unless_told_not_to() -> None:
    ztunnel: Any = SimpleNamespace(ip="10.244.0.5")
    default = create_mode("legacy")
    assert default.facts()["same_node_fast_path"] == "True"
    assert isinstance(default, LegacyMode)
    assert default.ztunnel_args("node1", ztunnel)[-2:] == ["--same-node-fast-path", "on"]
    off = create_mode("legacy", {"same_node_fast_path": False})
    assert isinstance(off, LegacyMode)
    assert off.ztunnel_args("node1", ztunnel)[-2:] == ["--same-node-fast-path", "off"]
    with pytest.raises(ModeError, match="same_node_fast_path"):
        create_mode("legacy", {"same_node_fast_path": "sometimes"})


@pytest.mark.parametrize(
    ("options", "message"),
    [({"tunnel": "gre"}, "tunnel 'gre'"), ({"colour": "red"}, "unknown option")],
)
def test_legacy_mode_rejects_bad_options(options: dict[str, str], message: str) -> None:
    with pytest.raises(ModeError, match=message):
        create_mode("legacy", options)
