"""Starting a measurement server in a host and knowing, without blind sleeps, that it listens."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from testbed.measure.errors import MeasureError
from testbed.measure.host import Host, Process

LISTEN_TIMEOUT = 5.0
POLL_INTERVAL = 0.02


def is_listening(host: Host, port: int, *, tcp: bool = True) -> bool:
    """Whether some socket in `host`'s namespace listens on (TCP) or is bound to (UDP) `port`."""
    flags = "-ltn" if tcp else "-lun"
    result = host.run(["ss", "-H", flags, "sport", "=", f":{port}"], timeout=5.0, check=False)
    return result.returncode == 0 and bool(result.stdout.strip())


def _port_holders(host: Host, port: int, *, tcp: bool) -> str:
    """Every socket on `port` in the host (any state, with its process): why a bind failed."""
    flags = "-tanp" if tcp else "-uanp"
    result = host.run(["ss", "-H", flags, "sport", "=", f":{port}"], timeout=5.0, check=False)
    return " | ".join(line.strip() for line in result.stdout.splitlines() if line.strip())


def wait_listening(
    host: Host, server: Process, port: int, *, tcp: bool = True, timeout: float = LISTEN_TIMEOUT
) -> None:
    """Poll until `port` listens in `host`; fail early if `server` exits, late after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        code = server.poll()
        if code is not None:
            holders = _port_holders(host, port, tcp=tcp)
            raise MeasureError(
                f"server exited with {code} before listening: {server.output()}"
                + (f"; sockets on port {port}: {holders}" if holders else "")
            )
        if is_listening(host, port, tcp=tcp):
            return
        if time.monotonic() > deadline:
            raise MeasureError(f"nothing listens on port {port} after {timeout} s")
        time.sleep(POLL_INTERVAL)


@contextmanager
def serving(
    host: Host, argv: Sequence[str], *, label: str, port: int, tcp: bool = True
) -> Iterator[Process]:
    """Spawn a server in `host`, yield it once it listens on `port`, always stop it after."""
    server = host.spawn(argv, label=label)
    try:
        wait_listening(host, server, port, tcp=tcp)
        yield server
    finally:
        server.terminate()


def run_client(
    host: Host, argv: Sequence[str], *, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a measurement client to completion; its exit code is left to the caller's parser,
    a client that hangs past `timeout` is a MeasureError."""
    try:
        return host.run(argv, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise MeasureError(f"{argv[0]} client still running after {timeout} s") from None
