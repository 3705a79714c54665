"""The spec's workload names mapped to testbed.measure calls.

Each function runs one case's workload from `client` to `server` and returns its
measurements; `raw_dir` (None during warm-up) receives the tools' raw output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from testbed.experiment.cases import Case


class MeasurementLike(Protocol):
    # read-only members, so that frozen dataclasses (testbed.measure.rows.Measurement) match
    @property
    def metric(self) -> str: ...
    @property
    def value(self) -> float: ...
    @property
    def unit(self) -> str: ...
    @property
    def labels(self) -> dict[str, str]: ...


WorkloadFunction = Callable[[Any, Any, Case, Path | None], Sequence[MeasurementLike]]


def tcp_stream(client: Any, server: Any, case: Case, raw_dir: Path | None) -> Sequence[Any]:
    from testbed.measure.iperf import run_throughput

    parallel = case.parallel or 1
    return run_throughput(
        client, server, server.ip, duration=case.duration, parallel=parallel, raw_dir=raw_dir
    )


def tcp_rr(client: Any, server: Any, case: Case, raw_dir: Path | None) -> Sequence[Any]:
    from testbed.measure.sockperf import run_pingpong

    size = case.msg_size or 64
    return run_pingpong(
        client, server, server.ip, duration=int(case.duration), msg_size=size, raw_dir=raw_dir
    )


def tcp_crr(client: Any, server: Any, case: Case, raw_dir: Path | None) -> Sequence[Any]:
    from testbed.measure.rr import run_crr

    size = case.msg_size or 64
    return run_crr(client, server, server.ip, duration=case.duration, size=size, raw_dir=raw_dir)


def http_fixed_qps(client: Any, server: Any, case: Case, raw_dir: Path | None) -> Sequence[Any]:
    # Warms up on the very connections it then measures (see SELF_WARMING).
    return _http_at_fixed_qps(client, server, case, raw_dir, new_connection=False)


def http_crr(client: Any, server: Any, case: Case, raw_dir: Path | None) -> Sequence[Any]:
    """HTTP/1.1 at a fixed rate with a new connection per request (fortio -keepalive=false)."""
    return _http_at_fixed_qps(client, server, case, raw_dir, new_connection=True)


def _http_at_fixed_qps(
    client: Any, server: Any, case: Case, raw_dir: Path | None, *, new_connection: bool
) -> Sequence[Any]:
    from testbed.measure.http import run_http_fixed_qps

    return run_http_fixed_qps(
        client,
        server,
        server.ip,
        qps=_swept(case.qps, "qps"),
        connections=_swept(case.connections, "connections"),
        duration=case.duration,
        payload=case.payload or 1024,
        warmup=case.warmup,
        new_connection=new_connection,
        raw_dir=raw_dir,
    )


def _swept(value: int | None, name: str) -> int:
    if value is None:
        raise ValueError(f"case has no {name}")
    return value


WORKLOADS: dict[str, WorkloadFunction] = {
    "tcp_stream": tcp_stream,
    "tcp_rr": tcp_rr,
    "tcp_crr": tcp_crr,
    "http_fixed_qps": http_fixed_qps,
    "http_crr": http_crr,
}
