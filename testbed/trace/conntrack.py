"""Conntrack entries of a namespace (`conntrack -L`, or /proc/net/nf_conntrack), per flow.

An entry has the original tuple (as the first packet left its sender) and the reply tuple
(as the answers will come back): after REDIRECT or DNAT the reply's source is the new
destination, which is how the walk tells where a connection was really delivered.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

Tuple4 = tuple[str, int, str, int]  # src ip, src port, dst ip, dst port


@dataclass(frozen=True)
class Entry:
    protocol: str
    state: str
    original: Tuple4
    reply: Tuple4
    mark: int
    zone: int

    @property
    def key(self) -> tuple[str, Tuple4]:
        return (self.protocol, self.original)

    @property
    def nat(self) -> str:
        """What translated the connection, read off the tuples ("" when nothing did)."""
        src, sport, dst, dport = self.original
        rsrc, rsport, rdst, rdport = self.reply
        changes = []
        if (rsrc, rsport) != (dst, dport):
            kind = "REDIRECT" if rsrc in ("127.0.0.1", src) else "DNAT"
            changes.append(f"{kind} {dst}:{dport} -> {rsrc}:{rsport}")
        if (rdst, rdport) != (src, sport):
            changes.append(f"SNAT {src}:{sport} -> {rdst}:{rdport}")
        return ", ".join(changes)

    def text(self) -> str:
        src, sport, dst, dport = self.original
        rsrc, rsport, rdst, rdport = self.reply
        extra = f" mark=0x{self.mark:x}" if self.mark else ""
        extra += f" zone={self.zone}" if self.zone else ""
        return (
            f"{self.protocol} {self.state} {src}:{sport} -> {dst}:{dport}"
            f" (reply {rsrc}:{rsport} -> {rdst}:{rdport}){extra}"
        )


def parse_entries(text: str) -> list[Entry]:
    """Entries of `conntrack -L` or /proc/net/nf_conntrack output (TCP and UDP)."""
    entries = []
    for line in text.splitlines():
        words = line.split()
        if "tcp" in words[:3]:
            protocol = "tcp"
        elif "udp" in words[:3]:
            protocol = "udp"
        else:
            continue
        pairs = [w.split("=", 1) for w in words if "=" in w]
        tuples = [value for key, value in pairs if key in ("src", "dst", "sport", "dport")]
        if len(tuples) < 8:
            continue
        fields = dict(pairs)
        state = next((w for w in words if w.isupper() and "=" not in w and "[" not in w), "")
        original = (tuples[0], int(tuples[2]), tuples[1], int(tuples[3]))
        reply = (tuples[4], int(tuples[6]), tuples[5], int(tuples[7]))
        mark = int(fields.get("mark", "0"), 0)
        entries.append(Entry(protocol, state, original, reply, mark, int(fields.get("zone", "0"))))
    return entries


def new_entries(before: Iterable[Entry], after: Iterable[Entry]) -> list[Entry]:
    """Entries the connection created: present after it and not before."""
    old = {entry.key for entry in before}
    return [entry for entry in after if entry.key not in old]


def involves(entry: Entry, endpoints: Iterable[tuple[str, int]]) -> bool:
    """Whether either end of either tuple is one of the (ip, port) endpoints."""
    wanted = set(endpoints)
    src, sport, dst, dport = entry.original
    rsrc, rsport, rdst, rdport = entry.reply
    ends = {(src, sport), (dst, dport), (rsrc, rsport), (rdst, rdport)}
    return bool(ends & wanted)
