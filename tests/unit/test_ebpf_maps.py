"""The ebpf mode's map layouts and tool-output parsing, without BPF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.redirect import bpfload, bpfmaps
from testbed.redirect.bpfmaps import PodEntry, ZtunnelEntry
from testbed.redirect.ebpf_node import node_sysctls, ztunnel_dns_argv, ztunnel_routing_argvs


def test_pod_key_is_the_address_in_network_byte_order() -> None:
    assert bpfmaps.pod_key("10.1.0.2") == bytes([10, 1, 0, 2])


def test_pod_value_matches_struct_pod_info() -> None:
    value = bpfmaps.pod_value(PodEntry("10.1.0.2", 7, "aa:bb:cc:dd:ee:0f"))
    # __u32 ifindex (host order, little endian here), __u8 mac[6], __u8 pad[2]
    assert value == bytes([7, 0, 0, 0, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE, 0x0F, 0, 0])


def test_ztunnel_value_matches_struct_ztunnel_info() -> None:
    value = bpfmaps.ztunnel_value(ZtunnelEntry(258, "10.1.0.9", "02:00:00:00:00:01"))
    assert value == bytes([2, 1, 0, 0, 10, 1, 0, 9, 2, 0, 0, 0, 0, 1, 0, 0])


def test_ztunnel_value_carries_the_capture_dns_flag() -> None:
    value = bpfmaps.ztunnel_value(ZtunnelEntry(258, "10.1.0.9", "02:00:00:00:00:01", True))
    assert value[-2:] == bytes([bpfmaps.CAPTURE_DNS_FLAG, 0])  # __u8 flags, __u8 pad


def test_a_detached_ztunnel_is_ifindex_zero() -> None:
    assert bpfmaps.ztunnel_value(bpfmaps.DETACHED) == bytes(16)


def test_host_value_is_the_address() -> None:
    assert bpfmaps.host_value("10.1.0.1") == bytes([10, 1, 0, 1])


def test_pod_entry_round_trips_through_a_bpftool_dump() -> None:
    entry = PodEntry("10.1.0.2", 300, "de:ad:be:ef:00:01")
    dump = [
        {
            "key": [f"0x{b:02x}" for b in bpfmaps.pod_key(entry.ip)],
            "value": [f"0x{b:02x}" for b in bpfmaps.pod_value(entry)],
            "formatted": {"key": 0, "value": {}},
        },
        {"key": ["0x0a", "0x00", "0x00", "0x01"], "error": "no such entry"},
    ]
    pairs = bpfmaps.parse_dump(json.dumps(dump))
    assert [bpfmaps.decode_pod(k, v) for k, v in pairs] == [entry]


def test_empty_dump() -> None:
    assert bpfmaps.parse_dump("[]") == []
    assert bpfmaps.parse_dump("") == []


def test_hex_args_for_bpftool() -> None:
    assert bpfmaps.hex_args(bytes([10, 255])) == ["hex", "0a", "ff"]


@pytest.mark.parametrize("bad", ["aa:bb", "zz:bb:cc:dd:ee:ff", ""])
def test_bad_mac_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        bpfmaps.mac_bytes(bad)


def test_filter_names_come_from_the_pin_not_the_truncated_kernel_name() -> None:
    shown = [
        {"protocol": "all", "pref": 1, "kind": "bpf", "chain": 0},
        {
            "protocol": "all",
            "pref": 1,
            "kind": "bpf",
            "options": {
                "handle": "0x1",
                "bpf_name": "ztunnel_host_ingress:[*fsobj]",
                "direct-action": True,
                "prog": {"id": 12, "name": "ztunnel_host_in"},
            },
        },
    ]
    assert bpfload.parse_filter_names(json.dumps(shown)) == ["ztunnel_host_ingress"]
    assert bpfload.parse_filter_names("") == []


def test_missing_object_names_the_build_command(tmp_path: Path) -> None:
    with pytest.raises(bpfload.BpfLoadError, match="make setup"):
        bpfload.object_path(tmp_path / "absent.bpf.o")


def test_verifier_failure_message_keeps_the_tail_of_the_log() -> None:
    log = "\n".join(f"line {i}" for i in range(100)) + "\nR0 invalid mem access 'scalar'"
    message = bpfload._load_failure(bpfload.OBJECT, log)
    assert "nothing attached" in message
    assert "R0 invalid mem access" in message
    assert "line 0\n" not in message
    assert f"last {bpfload.VERIFIER_LOG_LINES} of 101 lines" in message


def test_ztunnel_namespace_routes_marked_packets_locally() -> None:
    assert ztunnel_routing_argvs() == [
        ["rule", "add", "priority", "20000", "fwmark", "0x400/0xfff", "lookup", "100"],
        ["route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"],
    ]
    assert node_sysctls("vp3") == {
        "net.ipv4.conf.all.rp_filter": 0,
        "net.ipv4.conf.vp3.rp_filter": 0,
    }


def test_captured_dns_in_ztunnel_namespace_goes_to_the_dns_proxy() -> None:
    assert ztunnel_dns_argv("10.1.0.9") == [
        "-t", "nat", "-A", "PREROUTING", "-i", "eth0", "-p", "udp", "--dport", "53",
        "-j", "DNAT", "--to-destination", "10.1.0.9:15053",
    ]  # fmt: skip


def test_the_c_sources_and_python_agree_on_names() -> None:
    source = (bpfload.BPF_DIR / "ambient_redirect.bpf.c").read_text()
    maps = (bpfload.BPF_DIR / "ambient_maps.h").read_text()
    for program in bpfload.PROGRAMS:
        assert f"int {program}(struct __sk_buff *skb)" in source
    for name in bpfmaps.MAP_NAMES:
        assert f'}} {name} SEC(".maps");' in maps
    assert "#define TPROXY_MARK 0x400" in source
    assert f"#define ZTUNNEL_CAPTURE_DNS 0x{bpfmaps.CAPTURE_DNS_FLAG:x}" in maps
