"""Pure parts of testbed.trace: parsers of recorded tool output, record matching, the
expected-walk comparison and the diagram's arrows (no namespaces needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.trace import conntrack, expected, links, netfilter, proxies
from testbed.trace.diagram import DiagramError, dot_source, render, segments
from testbed.trace.probe import Outcome, request_size
from testbed.trace.run import TraceResult
from testbed.trace.walk import Hop, Place, number, text_walk

FIXTURES = Path(__file__).parent / "fixtures"

SAVE_BEFORE = """*nat
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
[2:120] -A OUTPUT -j ISTIO_OUTPUT
[0:0] -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
[4:240] -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT \
--to-ports 15001
COMMIT
"""
SAVE_AFTER = SAVE_BEFORE.replace("[2:120]", "[3:180]").replace("[4:240]", "[5:300]")


def test_rule_hits_are_counter_deltas_without_plain_jumps() -> None:
    hits = netfilter.rule_hits(
        netfilter.parse_iptables_save(SAVE_BEFORE), netfilter.parse_iptables_save(SAVE_AFTER)
    )
    assert len(hits) == 1  # the plain jump moved too, but says nothing; the lo rule did not
    (hit,) = hits
    assert (hit.packets, hit.bytes, hit.rule.hook) == (1, 60, "OUTPUT")
    assert hit.target == "REDIRECT -> 15001"


def test_missing_rules_are_reported() -> None:
    after = SAVE_BEFORE.replace("[0:0] -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT\n", "")
    gone = netfilter.missing_rules(
        netfilter.parse_iptables_save(SAVE_BEFORE), netfilter.parse_iptables_save(after)
    )
    assert [r.spec for r in gone] == ["! -d 127.0.0.1/32 -o lo -j ACCEPT"]


def _nft(packets: int) -> str:
    return json.dumps(
        {
            "nftables": [
                {
                    "chain": {
                        "family": "inet",
                        "table": "istio-ambient-nat",
                        "name": "output",
                        "hook": "output",
                    }
                },
                {
                    "rule": {
                        "family": "inet",
                        "table": "istio-ambient-nat",
                        "chain": "output",
                        "expr": [{"jump": {"target": "istio-output"}}],
                    }
                },
                {
                    "rule": {
                        "family": "inet",
                        "table": "istio-ambient-nat",
                        "chain": "istio-output",
                        "expr": [
                            {
                                "match": {
                                    "op": "!=",
                                    "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                                    "right": "127.0.0.1",
                                }
                            },
                            {"counter": {"packets": packets, "bytes": 60 * packets}},
                            {"redirect": {"port": 15001}},
                        ],
                    }
                },
                {
                    "rule": {
                        "family": "ip",
                        "table": "nat",
                        "chain": "OUTPUT",
                        "expr": [{"counter": {"packets": 9, "bytes": 9}}],
                    }
                },
            ]
        }
    )


def test_nft_counters_skip_iptables_nft_tables_and_find_the_hook() -> None:
    before, after = netfilter.parse_nft_json(_nft(1)), netfilter.parse_nft_json(_nft(2))
    assert [r.table for r in after] == ["inet istio-ambient-nat"]
    (hit,) = netfilter.rule_hits(before, after)
    assert hit.rule.hook == "OUTPUT"
    assert hit.target == "redirect to :15001"


CONNTRACK = (
    "tcp      6 119 TIME_WAIT src=10.244.1.2 dst=10.244.2.2 sport=45678 dport=8080 "
    "src=127.0.0.1 dst=10.244.1.2 sport=15001 dport=45678 [ASSURED] mark=273 use=1\n"
    "ipv4     2 tcp      6 299 ESTABLISHED src=10.244.1.2 dst=10.244.2.2 sport=49366 "
    "dport=15008 src=10.244.2.2 dst=10.244.1.2 sport=15008 dport=49366 [ASSURED] mark=0 "
    "zone=3 use=1\n"
    "icmp     1 29 src=10.244.1.2 dst=10.244.2.2 type=8 code=0 id=1\n"
)


def test_conntrack_entries_and_nat() -> None:
    redirected, hbone = conntrack.parse_entries(CONNTRACK)
    assert redirected.nat == "REDIRECT 10.244.2.2:8080 -> 127.0.0.1:15001"
    assert redirected.mark == 0x111 and redirected.state == "TIME_WAIT"
    assert hbone.nat == "" and hbone.zone == 3
    assert conntrack.involves(redirected, [("10.244.1.2", 45678)])
    assert not conntrack.involves(hbone, [("10.244.1.2", 45678)])
    assert conntrack.new_entries([hbone], [redirected, hbone]) == [redirected]


def test_link_deltas_carry_tunnel_vni() -> None:
    def dump(rx: int) -> str:
        return json.dumps(
            [
                {"ifname": "lo", "stats64": {"rx": {"packets": rx}, "tx": {"packets": rx}}},
                {
                    "ifname": "istioout",
                    "linkinfo": {"info_kind": "vxlan", "info_data": {"id": 1001}},
                    "stats64": {"rx": {"packets": rx, "bytes": rx}, "tx": {"packets": 0}},
                },
            ]
        )

    (delta,) = links.link_deltas(links.parse_links(dump(1)), links.parse_links(dump(4)))
    assert delta.rx_packets == 3 and delta.label == "vxlan istioout VNI 1001"


def test_connection_records_from_a_recorded_sample() -> None:
    records = proxies.parse_connections((FIXTURES / "trace_connections.json").read_text())
    assert [r.id for r in records] == [41, 42, 43]
    assert records[0].upstream == "10.244.2.2:15008" and records[1].closed is None
    assert records[2].peer is None and records[2].reason == "RBAC: access denied"
    window = (1796150000.0, 1796150000.2)
    mine = [
        r
        for r in records
        if proxies.belongs_to(
            r,
            client="10.244.1.2:23001",
            destinations={"10.244.2.2:8080"},
            window=window,
            request_bytes=request_size(23001),
        )
    ]
    assert [r.id for r in mine] == [41]  # the other one is another trace's (other size)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("not json", "not JSON"),
        ('{"conns": []}', "expected"),
        ('{"connections": [{"id": "7"}]}', r"connections\[0\]\.id: expected int"),
    ],
)
def test_bad_connection_records_name_the_field(body: str, message: str) -> None:
    with pytest.raises(proxies.RecordError, match=message):
        proxies.parse_connections(body)


def test_metric_deltas() -> None:
    page = (
        'istio_tcp_connections_opened_total{reporter="source",source_workload="client"} 3\n'
        "# HELP other\nistio_requests_total 9\n"
    )
    before = proxies.parse_tcp_metrics(page)
    after = proxies.parse_tcp_metrics(page.replace("} 3", "} 4"))
    (delta,) = proxies.metric_deltas(before, after)
    assert delta.delta == 1 and delta.labels["reporter"] == "source"


def _result(hops: list[Hop], ok: bool = True) -> TraceResult:
    outcome = Outcome(
        ok,
        None if ok else "timed out after 3 s",
        ("10.244.1.2", 23001),
        ("10.244.2.2", 8080),
        "t",
        48,
    )
    places = [
        Place("client", "ns-c", "pod", "node1", "10.244.1.2"),
        Place("ztunnel-node1", "ns-z1", "proxy", "node1", "10.244.1.4"),
        Place("node1", "ns-n1", "node", "node1"),
        Place("ztunnel-node2", "ns-z2", "proxy", "node2", "10.244.2.3"),
        Place("server2", "ns-s", "pod", "node2", "10.244.2.2"),
    ]
    return TraceResult(
        "r",
        "inpod",
        "client",
        "server2:8080",
        "cross-node",
        outcome,
        number(hops),
        places,
        0.1,
        server_ip="10.244.2.2",
        variant="redirect",
    )


INPOD_WALK = [
    Hop(
        "netfilter",
        "client",
        "OUTPUT nat ISTIO_OUTPUT REDIRECT -> 15001 (1 packet)",
        "c",
        {"chain": "ISTIO_OUTPUT"},
    ),
    Hop(
        "proxy",
        "ztunnel-node1",
        "ztunnel-node1 outbound on 15001",
        "r",
        {"proxy": "ztunnel-node1", "direction": "outbound", "path": "hbone", "listener": 15001},
    ),
    Hop(
        "conntrack",
        "client",
        "tcp ESTABLISHED 10.244.1.2:4 -> 10.244.2.2:15008 (reply ...)",
        "c",
        {"original": ["10.244.1.2", 4, "10.244.2.2", 15008]},
    ),
    Hop("link", "node1", "veth eth0: rx 1 tx 1 packets", "l", {"kind": "veth", "device": "eth0"}),
    Hop(
        "proxy",
        "ztunnel-node2",
        "ztunnel-node2 inbound on 15008",
        "r",
        {"proxy": "ztunnel-node2", "direction": "inbound", "path": "hbone", "listener": 15008},
    ),
    Hop("app", "server2", "the server saw the connection from 10.244.1.2:5", "a"),
]


def test_expected_walk_matches_and_reports_differences() -> None:
    assert expected.differences(_result(list(INPOD_WALK))) == []
    broken = _result(INPOD_WALK[1:], ok=False)
    found = expected.differences(broken)
    assert found[0].startswith("missing: client: netfilter matching")
    assert found[-1] == "the connection failed: timed out after 3 s"
    extra = Hop(
        "netfilter",
        "server2",
        "PREROUTING nat ISTIO_PRERT REDIRECT -> 15006 (1 packet)",
        "c",
        {"chain": "ISTIO_PRERT"},
    )
    assert expected.differences(_result([*INPOD_WALK, extra]))[0].startswith("unexpected")


def test_text_walk_numbers_hops() -> None:
    text = text_walk(_result(list(INPOD_WALK)).hops)
    assert text.splitlines()[0] == "1. client: OUTPUT nat ISTIO_OUTPUT REDIRECT -> 15001 (1 packet)"


def test_diagram_arrows_follow_the_walk_and_colour_mtls() -> None:
    result = _result(list(INPOD_WALK))
    moves = segments(result)
    assert [(a, b) for a, b, _, _ in moves] == [
        ("client", "ztunnel-node1"),
        ("ztunnel-node1", "node1"),
        ("node1", "ztunnel-node2"),
        ("ztunnel-node2", "server2"),
    ]
    assert [secure for *_, secure in moves] == [False, True, True, False]
    assert "HBONE -> 10.244.2.2:15008" in moves[1][2]
    edges = [line for line in dot_source(result).source.splitlines() if "penwidth" in line]
    assert len(edges) == len(moves)


def test_diagram_refuses_other_formats(tmp_path: Path) -> None:
    with pytest.raises(DiagramError, match=r"\.svg or \.png"):
        render(_result(list(INPOD_WALK)), tmp_path / "walk.pdf")


def test_nftrace_events_of_the_trace_port_only() -> None:
    from testbed.trace import nftrace

    text = (FIXTURES / "trace_xtables_monitor.txt").read_text()
    events = nftrace.parse_events(text, 21111)
    redirect = [e for e in events if e.chain == "ISTIO_OUTPUT" and e.table == "nat"]
    assert [e.spec for e in redirect] == [
        "! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001"
    ]
    assert not [e for e in events if e.table.startswith("testbed-trace")]
    assert nftrace.parse_events(text, 21112) == []  # another trace's port sees nothing
    rule = netfilter.parse_iptables_save(SAVE_AFTER)[-1]
    assert nftrace.packets_meeting(rule, events) == 1


def test_nftrace_table_marks_both_directions_of_the_port() -> None:
    from testbed.trace import nftrace

    script = nftrace.rules_script(21111)
    assert "priority -350" in script
    assert script.count("meta nftrace set 1") == 4
    assert "tcp sport 21111" in script and "tcp dport 21111" in script


def test_trace_request_is_http_of_the_trace_size() -> None:
    from testbed.trace import probe

    raw = probe.request_bytes("10.96.0.10", "abc123", probe.request_size(23001))
    assert len(raw) == probe.request_size(23001)
    assert raw.startswith(b"GET /testbed-trace/abc123 HTTP/1.1\r\nHost: 10.96.0.10\r\n")
    assert raw.endswith(b"\r\n\r\n")
    assert probe.token_of(raw.decode()) == "abc123"
    assert probe.token_of("GET / HTTP/1.1\r\n\r\n") == ""
