"""The ebpf mode's maps (testbed/redirect/bpf/ambient_maps.h), read and written via bpftool.

Keys and values are packed here byte for byte as the C structs lay them out: IPv4
addresses in network byte order, ifindexes in host (little-endian) byte order. The
encoders are pure functions so the layouts are tested without BPF.
"""

from __future__ import annotations

import ipaddress
import json
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.netlab.errors import TestbedError

POD_MAP = "pod_map"
ZTUNNEL_MAP = "ztunnel_map"
HOST_MAP = "host_map"
MAP_NAMES = (POD_MAP, ZTUNNEL_MAP, HOST_MAP)
ARRAY_KEY = bytes(4)  # slot 0 of the single-entry array maps

_POD_VALUE = struct.Struct("<I6s2x")  # struct pod_info
_ZTUNNEL_VALUE = struct.Struct("<I4s6sBx")  # struct ztunnel_info
CAPTURE_DNS_FLAG = 0x1  # ZTUNNEL_CAPTURE_DNS in ztunnel_info.flags
_HOST_VALUE = struct.Struct("<4s")  # struct host_info


class BpfMapError(TestbedError, RuntimeError):
    """bpftool could not read or write a map."""


@dataclass(frozen=True)
class PodEntry:
    """An enrolled pod as the programs see it."""

    ip: str
    ifindex: int  # host-side veth, node namespace
    mac: str  # pod eth0, aa:bb:cc:dd:ee:ff


@dataclass(frozen=True)
class ZtunnelEntry:
    ifindex: int  # ztunnel's host-side veth, node namespace; 0: no ztunnel attached
    ip: str
    mac: str  # ztunnel's eth0
    capture_dns: bool = False  # the pods' UDP 53 goes to ztunnel too


DETACHED = ZtunnelEntry(0, "0.0.0.0", "00:00:00:00:00:00")  # an array slot cannot be deleted


def ipv4_bytes(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(part, 16) for part in parts)


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def pod_key(ip: str) -> bytes:
    return ipv4_bytes(ip)


def pod_value(entry: PodEntry) -> bytes:
    return _POD_VALUE.pack(entry.ifindex, mac_bytes(entry.mac))


def ztunnel_value(entry: ZtunnelEntry) -> bytes:
    flags = CAPTURE_DNS_FLAG if entry.capture_dns else 0
    return _ZTUNNEL_VALUE.pack(entry.ifindex, ipv4_bytes(entry.ip), mac_bytes(entry.mac), flags)


def host_value(ip: str) -> bytes:
    return _HOST_VALUE.pack(ipv4_bytes(ip))


def decode_pod(key: bytes, value: bytes) -> PodEntry:
    ifindex, mac = _POD_VALUE.unpack(value)
    return PodEntry(str(ipaddress.IPv4Address(key)), ifindex, mac_text(mac))


def hex_args(raw: bytes) -> list[str]:
    """bpftool's `hex` byte list for a key or value."""
    return ["hex", *(f"{b:02x}" for b in raw)]


def parse_dump(text: str) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs of `bpftool -j map dump` output."""
    return [
        (_bytes_of(item["key"]), _bytes_of(item["value"]))
        for item in json.loads(text or "[]")
        if "value" in item  # entries bpftool could not read carry an "error" instead
    ]


def _bytes_of(hex_list: Sequence[str]) -> bytes:
    return bytes(int(b, 16) for b in hex_list)


class PinnedMaps:
    """The maps of one loaded object, pinned in a directory of the run's bpffs."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def path(self, name: str) -> Path:
        return self.dir / name

    def put_pod(self, entry: PodEntry) -> None:
        self._update(POD_MAP, pod_key(entry.ip), pod_value(entry))

    def remove_pod(self, ip: str) -> None:
        self._bpftool(
            "map", "delete", "pinned", str(self.path(POD_MAP)), "key", *hex_args(pod_key(ip))
        )

    def pods(self) -> list[PodEntry]:
        return [decode_pod(k, v) for k, v in self._dump(POD_MAP)]

    def set_ztunnel(self, entry: ZtunnelEntry) -> None:
        self._update(ZTUNNEL_MAP, ARRAY_KEY, ztunnel_value(entry))

    def set_host(self, ip: str) -> None:
        self._update(HOST_MAP, ARRAY_KEY, host_value(ip))

    def _update(self, name: str, key: bytes, value: bytes) -> None:
        self._bpftool(
            "map", "update", "pinned", str(self.path(name)),
            "key", *hex_args(key), "value", *hex_args(value),
        )  # fmt: skip

    def _dump(self, name: str) -> list[tuple[bytes, bytes]]:
        return parse_dump(self._bpftool("-j", "map", "dump", "pinned", str(self.path(name))))

    @staticmethod
    def _bpftool(*args: str) -> str:
        done = subprocess.run(["bpftool", *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BpfMapError(f"bpftool {' '.join(args)}: {done.stderr.strip() or done.stdout}")
        return done.stdout
