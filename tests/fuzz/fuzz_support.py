"""Shared parts of the fuzz targets: the input counter, the seed corpus and an RSS probe.

Two ways to run (`tests/fuzz/conftest.py` picks the hypothesis profile):
- CI (`pytest tests`): profile "ci", derandomized, a few hundred examples per target, plus
  a replay of every seed saved in tests/fuzz/corpus/<target>/.
- `make fuzz`: profile "fuzz", FUZZ_EXAMPLES examples per target (run.py: 100,000 inputs
  over the inputs per example, BATCH for a server), random; inputs that show a new outcome
  (an exception type, a status, an error code) are saved as seeds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).parent / "corpus"
SUMMARY = Path(os.environ.get("FUZZ_SUMMARY", "/tmp/testbed-fuzz-summary.json"))
SAVE_SEEDS = os.environ.get("FUZZ_PROFILE") == "fuzz"
MAX_SEEDS = 200  # per target: enough to replay every outcome class quickly in CI

inputs_tried: Counter[str] = Counter()
_outcomes: dict[str, set[str]] = {}


_STOP_AT = time.monotonic() + float(os.environ.get("FUZZ_SECONDS", "inf"))
"""`make fuzz` bounds each target's time too; past it, inputs are skipped uncounted."""


def tried(target: str) -> bool:
    """Count one input of `target`; False (skip it) once the time bound has passed."""
    if time.monotonic() > _STOP_AT:
        return False
    inputs_tried[target] += 1
    return True


def note_outcome(target: str, outcome: str, data: bytes) -> None:
    """Save `data` as a seed the first time `outcome` is seen for `target` (fuzz runs)."""
    seen = _outcomes.setdefault(target, set())
    if outcome in seen:
        return
    seen.add(outcome)
    if not SAVE_SEEDS:
        return
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    if sum(1 for _ in folder.iterdir()) >= MAX_SEEDS:
        return
    (folder / f"{hashlib.sha1(data).hexdigest()[:16]}.bin").write_bytes(data)


def seeds(target: str) -> Iterator[bytes]:
    folder = CORPUS / target
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            yield path.read_bytes()


REPLAYED = int(os.environ.get("FUZZ_REPLAYED", "100"))  # seeds per target in CI, by name


def replay(target: str, one_input: Callable[[bytes], None]) -> int:
    count = 0
    for data in itertools.islice(seeds(target), REPLAYED):
        one_input(data)
        count += 1
    return count


def rss_bytes(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc status")


def write_summary() -> None:
    if not inputs_tried:
        return
    previous = json.loads(SUMMARY.read_text()) if SUMMARY.exists() else {}
    previous.update(inputs_tried)
    SUMMARY.write_text(json.dumps(previous, indent=1, sort_keys=True) + "\n")


def exchange(address: tuple[str, int], data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data` on a fresh TCP connection, half-close, and read until the peer closes."""
    import socket

    with socket.create_connection(address, timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading everything: fine
        received = bytearray()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # closing with unread bytes in its buffer makes the kernel send RST
        return bytes(received)


# ---------------------------------------------------------------- HTTP/2 frames (RFC 9113)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
ACK, END_STREAM, END_HEADERS = 0x1, 0x1, 0x4
PROTOCOL_ERROR = 0x1
MAX_ERROR_CODE = 0xD  # HTTP_1_1_REQUIRED, the last code RFC 9113 defines


def h2_frame(
    kind: int, flags: int, stream_id: int, payload: bytes, length: int | None = None
) -> bytes:
    size = len(payload) if length is None else length
    return (
        (size & 0xFFFFFF).to_bytes(3, "big")
        + bytes([kind & 0xFF, flags & 0xFF])
        + (stream_id & 0xFFFFFFFF).to_bytes(4, "big")
        + payload
    )


def h2_frames(data: bytes) -> tuple[list[tuple[int, int, int, bytes]], bytes]:
    """Whole frames in `data` as (type, flags, stream id, payload), and what is left over."""
    frames = []
    pos = 0
    while len(data) - pos >= 9:
        size = int.from_bytes(data[pos : pos + 3], "big")
        if len(data) - pos - 9 < size:
            break
        kind, flags = data[pos + 3], data[pos + 4]
        stream_id = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        frames.append((kind, flags, stream_id, data[pos + 9 : pos + 9 + size]))
        pos += 9 + size
    return frames, data[pos:]


def is_frame_aligned(data: bytes) -> bool:
    """True if `data` is a preface followed by whole frames (so a PING after it is read)."""
    if not data.startswith(PREFACE):
        return False
    _, rest = h2_frames(data[len(PREFACE) :])
    return rest == b""


def client_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    return h2_frames(data[len(PREFACE) :])[0] if data.startswith(PREFACE) else []


@dataclass
class H2Verdict:
    """What a server sent back on one connection."""

    goaway_codes: list[int]
    reset_codes: list[int]
    ping_acked: bool
    well_formed: bool
    first_kind: int | None

    def check(self, sent: bytes) -> None:
        """The HTTP/2 properties: frames parse, error codes are defined ones, and a
        connection the server ends on its own is ended with a GOAWAY."""
        assert self.well_formed, "the server sent bytes that are not HTTP/2 frames"
        for code in self.goaway_codes + self.reset_codes:
            assert 0 <= code <= MAX_ERROR_CODE, f"undefined HTTP/2 error code {code:#x}"
        peer_ended = any(kind == GOAWAY for kind, *_ in client_frames(sent))
        if not peer_ended:  # (a GOAWAY received may drop what was queued, SETTINGS too)
            assert self.first_kind in (None, SETTINGS), "the server preface is not SETTINGS"
        if is_frame_aligned(sent) and not self.ping_acked and not peer_ended:
            assert self.goaway_codes, "the server closed a connection without a GOAWAY"
            assert self.goaway_codes[-1] != 0, "a protocol error closed with NO_ERROR"


PING_PROBE = b"fuzzprob"


def h2_verdict(received: bytes) -> H2Verdict:
    frames, rest = h2_frames(received)
    return H2Verdict(
        goaway_codes=[
            int.from_bytes(p[4:8], "big") for k, _, _, p in frames if k == GOAWAY and len(p) >= 8
        ],
        reset_codes=[int.from_bytes(p[:4], "big") for k, _, _, p in frames if k == RST_STREAM],
        ping_acked=any(k == PING and f & ACK and p == PING_PROBE for k, f, _, p in frames),
        well_formed=rest == b"",
        first_kind=frames[0][0] if frames else None,
    )


def h2_probe() -> bytes:
    """Appended to every input: a PING the server must answer if the connection lives."""
    return h2_frame(PING, 0, 0, PING_PROBE)


BATCH = int(os.environ.get("FUZZ_BATCH", "16" if SAVE_SEEDS else "2"))
"""Inputs a server target takes per hypothesis example, each on its own connection, sent
concurrently; the server-wide properties (alive, the canary connection flows, RSS) are
checked once per batch. Profiled: hypothesis spends ~2-4 ms per example of its own (the
choice tree, mutations), several times the exchange itself (0.5 ms HTTP/1.1, 1.6 ms HTTP/2
on loopback); drawing 16 inputs in one example cuts that to ~0.6-1 ms per input. And a
connection under attack next to others is the situation the properties are about."""

_pool: Any = None


def in_parallel(check_one: Callable[[bytes], None], inputs: list[bytes]) -> None:
    """Run `check_one` on every input concurrently; re-raise the first failure."""
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="fuzz")
    for future in [_pool.submit(check_one, data) for data in inputs]:
        future.result()


class ServerProcess:
    """A server under fuzzing in its own process: `python SCRIPT ARGS` prints its port."""

    def __init__(self, script: Path, *args: str) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdin=subprocess.PIPE,  # the server ends when this closes (see end_with_parent)
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline().split()[0])
        self.address = ("127.0.0.1", self.port)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def end_with_parent() -> None:
    """In a server under fuzzing: exit once stdin (a pipe from the fuzzer) closes, so a
    fuzzer killed by a timeout or Ctrl-C leaves no server behind."""
    import sys
    import threading

    def wait() -> None:
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=wait, name="end-with-parent", daemon=True).start()
