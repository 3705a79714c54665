"""HBONE's timers: Istio ztunnel's defaults, and their overrides from the environment.

Istio's ztunnel sends a PING 10 s after an HBONE connection starts and 10 s after each ACK,
and gives up on the connection when an ACK has not come 20 s after its PING (both sides;
constants in its h2 module, not data-aware: traffic does not postpone a PING). Its pool
releases a connection nobody has asked for in 5 minutes (`POOL_UNUSED_RELEASE_TIMEOUT`).

Tests shorten them through the environment of the proxy processes (the proxy shell checks the
values once at start, so a bad one is one line naming the variable):
`POOL_UNUSED_RELEASE_TIMEOUT` (Istio's own variable), `TESTBED_HBONE_PING_INTERVAL` and
`TESTBED_HBONE_PING_TIMEOUT` (ours: Istio has no knob for these). A duration is seconds
(`1.5`) or a number with `ms`, `s` or `m`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from testbed.netlab.errors import TestbedError

PING_INTERVAL = 10.0
PING_TIMEOUT = 20.0
POOL_IDLE_TIMEOUT = 300.0

ENV_PING_INTERVAL = "TESTBED_HBONE_PING_INTERVAL"
ENV_PING_TIMEOUT = "TESTBED_HBONE_PING_TIMEOUT"
ENV_POOL_IDLE_TIMEOUT = "POOL_UNUSED_RELEASE_TIMEOUT"

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m)?")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}


class TimerError(TestbedError, ValueError):
    """An HBONE timer variable in the environment is not a positive duration."""


def parse_duration(name: str, text: str) -> float:
    """`"1.5"`, `"500ms"`, `"10s"`, `"5m"` -> seconds; TimerError naming `name` otherwise."""
    match = _DURATION.fullmatch(text.strip())
    seconds = float(match.group(1)) * _UNIT[match.group(2)] if match else 0.0
    if seconds <= 0:
        raise TimerError(
            f"{name}={text!r}: expected a positive duration such as 1.5, 500ms, 10s or 5m"
        )
    return seconds


@dataclass(frozen=True)
class HboneTimers:
    ping_interval: float = PING_INTERVAL
    ping_timeout: float = PING_TIMEOUT
    pool_idle_timeout: float = POOL_IDLE_TIMEOUT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HboneTimers:
        env = os.environ if environ is None else environ

        def read(name: str, default: float) -> float:
            text = env.get(name)
            return default if text is None else parse_duration(name, text)

        return cls(
            read(ENV_PING_INTERVAL, PING_INTERVAL),
            read(ENV_PING_TIMEOUT, PING_TIMEOUT),
            read(ENV_POOL_IDLE_TIMEOUT, POOL_IDLE_TIMEOUT),
        )
