"""The waypoint end to end on loopback: HBONE in, HTTP through the L7 pipeline, HBONE out to
echo servers behind a stand-in destination ztunnel (see waypoint_support)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import yaml
from hbone_support import run
from waypoint_support import (
    CLIENT,
    CLIENT_ADDRESS,
    FLAKY_VIP,
    INTRUDER,
    REVIEWS_VIP,
    WAYPOINT,
    WaypointLab,
    get,
    served_by,
    service_key,
    waypoint_lab,
)

from testbed.mesh.hbone import HboneError
from testbed.mesh.proxy.watch import watch
from testbed.mesh.waypoint.messages import HttpResponse

REVIEWS = service_key("reviews")


def rule(**fields: Any) -> dict[str, Any]:
    return fields


def prefix(path: str) -> list[dict[str, Any]]:
    return [{"path": {"type": "PathPrefix", "value": path}}]


L7 = {
    "routes": [
        {
            "name": "reviews",
            "parents": [REVIEWS],
            "rules": [
                rule(backends=[{"service": service_key("reviews-v1"), "weight": 80},
                               {"service": service_key("reviews-v2"), "weight": 20}]),
                rule(matches=prefix("/v2"), backends=[{"service": service_key("reviews-v2")}]),
                rule(matches=prefix("/slow"), fault={"delay": {"fixedDelay": 2.0}},
                     backends=[{"service": service_key("reviews-v1")}]),
                rule(matches=prefix("/timeout"), timeout=0.3,
                     backends=[{"service": service_key("reviews-v1")}]),
                rule(matches=prefix("/abort"), fault={"abort": {"httpStatus": 418}}),
            ],
        },
        {
            "name": "flaky",
            "parents": [service_key("flaky")],
            "rules": [
                rule(),  # Istio's default retry policy: 2 retries on 503 and more
                rule(matches=prefix("/no-retry"), retry={"attempts": 0}),
            ],
        },
    ],
    "policies": [
        {"name": "no-admin", "action": "DENY", "targets": [REVIEWS],
         "rules": [{"to": [{"paths": ["/admin*"]}]}]},
        {"name": "only-default", "action": "ALLOW",
         "rules": [{"from": [{"namespaces": ["default"]}]}]},
    ],
}  # fmt: skip


def in_lab(tmp_path: Path, scenario: Any) -> Any:
    async def main() -> Any:
        async with waypoint_lab(tmp_path, L7) as lab:
            return await scenario(lab)

    return run(main(), "uvloop")


def test_weighted_split_80_20_over_1000_requests(tmp_path: Path) -> None:
    async def scenario(lab: WaypointLab) -> collections.Counter[str | None]:
        clients = [await lab.http() for _ in range(4)]

        async def burst(client: Any) -> list[str | None]:
            return [served_by(await client.exchange(get("/reviews"))) for _ in range(250)]

        results = await asyncio.gather(*(burst(c) for c in clients))
        return collections.Counter(name for names in results for name in names)

    counts = in_lab(tmp_path, scenario)
    assert sum(counts.values()) == 1000
    assert 750 <= counts["r1"] <= 850, counts  # 80 % +- 4 standard deviations
    assert counts["r1"] + counts["r2"] == 1000


def test_path_route_selects_v2_and_abort_fault_answers(tmp_path: Path) -> None:
    async def scenario(lab: WaypointLab) -> tuple[set[str | None], int]:
        client = await lab.http()
        names = {served_by(await client.exchange(get(f"/v2/item/{i}"))) for i in range(20)}
        return names, (await client.exchange(get("/abort"))).status

    names, abort_status = in_lab(tmp_path, scenario)
    assert names == {"r2"}
    assert abort_status == 418


def test_default_retries_hide_503s_from_the_client(tmp_path: Path) -> None:
    async def scenario(lab: WaypointLab) -> tuple[list[int], list[int]]:
        client = await lab.http(FLAKY_VIP)
        retried = [(await client.exchange(get("/"))).status for _ in range(40)]
        plain = [(await client.exchange(get("/no-retry"))).status for _ in range(40)]
        return retried, plain

    retried, plain = in_lab(tmp_path, scenario)
    assert set(retried) == {200}
    assert 503 in plain and 200 in plain  # the broken endpoint is there to be hidden


def test_injected_delay_and_route_timeout(tmp_path: Path) -> None:
    async def scenario(lab: WaypointLab) -> tuple[float, int, int]:
        client = await lab.http()
        started = time.perf_counter()
        slow = await client.exchange(get("/slow"))
        elapsed = time.perf_counter() - started
        assert slow.status == 200
        timed_out = await lab.http()
        status = (await timed_out.exchange(get("/timeout?delay_ms=2000"))).status
        fast = (await client.exchange(get("/timeout?delay_ms=1"))).status
        return elapsed, status, fast

    elapsed, status, fast = in_lab(tmp_path, scenario)
    assert elapsed >= 2.0
    assert status == 504
    assert fast == 200


def test_deny_answers_403_and_policy_sees_the_client_identity(tmp_path: Path) -> None:
    async def scenario(lab: WaypointLab) -> dict[str, Any]:
        client = await lab.http()
        admin = await client.exchange(get("/admin/users"))
        ok = await client.exchange(get("/reviews"))
        intruder = await (await lab.http(identity=INTRUDER)).exchange(get("/reviews"))
        upstream_request = lab.destination.requests[-1]
        metrics = lab.waypoint.registry.render()
        return {"admin": admin, "ok": ok, "intruder": intruder, "up": upstream_request,
                "metrics": metrics}  # fmt: skip

    seen = in_lab(tmp_path, scenario)
    assert (seen["admin"].status, seen["admin"].body) == (403, b"RBAC: access denied")
    assert seen["ok"].status == 200
    assert seen["intruder"].status == 403  # only namespace default is allowed
    # The endpoint's ztunnel sees the waypoint's identity and no client address: as with
    # Istio, the app sees the waypoint as its peer (the client is in x-forwarded-for).
    assert seen["up"].peer_identity == WAYPOINT.uri
    assert seen["up"].forwarded_for is None
    metrics = seen["metrics"]
    assert 'response_code="403"' in metrics and 'response_code="200"' in metrics
    assert f'source_principal="{CLIENT.uri}"' in metrics
    assert 'destination_principal="spiffe://cluster.local/ns/default/sa/reviews"' in metrics
    assert "istio_request_duration_milliseconds_bucket{" in metrics


def test_http2_requests_are_routed_and_go_upstream_as_http2(tmp_path: Path) -> None:
    async def scenario(lab: WaypointLab) -> dict[int, tuple[str, str, bytes]]:
        reader, writer = await lab.connect()
        conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
        conn.initiate_connection()
        for stream_id in (1, 3):
            path = "/v2/x?format=json" if stream_id == 1 else "/admin"
            conn.send_headers(
                stream_id,
                [(":method", "GET"), (":path", path), (":scheme", "http"),
                 (":authority", "reviews")],
                end_stream=True,
            )  # fmt: skip
        writer.write(conn.data_to_send())
        answers: dict[int, tuple[str, str, bytes]] = {}
        bodies: dict[int, bytes] = collections.defaultdict(bytes)
        heads: dict[int, dict[str, str]] = {}
        while len(answers) < 2:
            data = await reader.read(65536)
            assert data, "waypoint closed the HTTP/2 connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    assert event.stream_id is not None
                    heads[event.stream_id] = {str(n): str(v) for n, v in event.headers or []}
                elif isinstance(event, h2.events.DataReceived):
                    assert event.stream_id is not None
                    bodies[event.stream_id] += event.data or b""
                    conn.acknowledge_received_data(event.flow_controlled_length or 0,
                                                   event.stream_id)  # fmt: skip
                elif isinstance(event, h2.events.StreamEnded):
                    assert event.stream_id is not None
                    head = heads[event.stream_id]
                    answers[event.stream_id] = (head[":status"], head.get("x-served-by", ""),
                                                bodies[event.stream_id])  # fmt: skip
            writer.write(conn.data_to_send())
        writer.close()
        return answers

    answers = in_lab(tmp_path, scenario)
    assert answers[1][:2] == ("200", "r2") and answers[3][:2] == ("403", "")
    assert json.loads(answers[1][2])["protocol"] == "HTTP/2"  # the app saw HTTP/2 too


@pytest.mark.parametrize(
    ("garbage", "expected"),
    [
        (b"GET /x HTTP/1.1 extra\r\n\r\n", b"HTTP/1.1 400"),
        (
            b"GET /x HTTP/1.1\r\nhost: r\r\nx-big: " + b"a" * (32 << 10) + b"\r\n\r\n",
            b"HTTP/1.1 431",
        ),
        (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", b""),  # broken preface: closed (maybe a GOAWAY)
    ],
    ids=["bad-request-line", "oversized-headers", "broken-h2-preface"],
)
def test_malformed_http_is_answered_and_others_keep_working(
    tmp_path: Path, garbage: bytes, expected: bytes
) -> None:
    async def scenario(lab: WaypointLab) -> tuple[bytes, int]:
        reader, writer = await lab.connect()
        writer.write(garbage)
        answer = await asyncio.wait_for(reader.read(), 5)  # until the waypoint closes
        writer.close()
        after = await (await lab.http()).exchange(get("/reviews"))
        return answer, after.status

    answer, status_after = in_lab(tmp_path, scenario)
    assert answer.startswith(expected)
    if not expected:
        assert b"HTTP/" not in answer
    assert status_after == 200


def test_non_http_passes_as_tcp_under_l4_policy(tmp_path: Path) -> None:
    async def scenario(lab: WaypointLab) -> tuple[bytes, bytes, bytes]:
        reader, writer = await lab.connect(FLAKY_VIP)
        writer.write(b"\x00\x01binary\r\n\r\n")
        writer.write_eof()  # the endpoint answers, then sees the end and closes
        passed = await asyncio.wait_for(reader.read(), 5)
        # A DENY with HTTP-only fields (paths) ignores them for TCP: reviews refuses all TCP.
        reader, writer = await lab.connect()
        writer.write(b"\x00\x01binary\r\n\r\n")
        denied = await asyncio.wait_for(reader.read(), 5)
        reader, writer = await lab.connect(FLAKY_VIP, identity=INTRUDER)
        writer.write(b"\x00\x01binary\r\n\r\n")
        try:
            refused = await asyncio.wait_for(reader.read(), 5)
        except ConnectionError:
            refused = b""
        return passed, denied, refused

    passed, denied, refused = in_lab(tmp_path, scenario)
    assert passed.startswith(b"HTTP/1.1 ")  # the endpoint's own answer to the bytes
    assert denied == refused == b""


def test_connect_to_an_unknown_target_is_refused(tmp_path: Path) -> None:
    async def scenario(lab: WaypointLab) -> int | None:
        try:
            await lab.connect("10.99.0.1:80")
        except HboneError as exc:
            return exc.status
        return None

    assert in_lab(tmp_path, scenario) == 400


def test_chunked_request_body_and_http10_close(tmp_path: Path) -> None:
    async def scenario(lab: WaypointLab) -> tuple[bytes, bytes]:
        reader, writer = await lab.connect()
        writer.write(
            b"POST /v2/echo HTTP/1.1\r\nhost: reviews\r\ntransfer-encoding: chunked\r\n"
            b"expect: 100-continue\r\n\r\n"
        )
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        echoed = await reader.readexactly(length)
        writer.write(b"GET /v2/x HTTP/1.0\r\n\r\n")  # HTTP/1.0: answered, then closed
        rest = await asyncio.wait_for(reader.read(), 5)
        return echoed, rest

    echoed, rest = in_lab(tmp_path, scenario)
    assert echoed == b"hello world"
    assert rest.startswith(b"HTTP/1.1 200") and b"connection: close" in rest


def test_a_changed_l7_file_is_picked_up(tmp_path: Path) -> None:
    async def scenario(lab: WaypointLab) -> tuple[int, int]:
        settings = lab.waypoint.settings
        l7_file = next(w for w in lab.waypoint.watched() if w.path == settings.l7_config)
        watcher = asyncio.create_task(watch(l7_file, interval=0.1))
        client = await lab.http()
        before = (await client.exchange(get("/v2/x"))).status
        deny_all = {"policies": [{"name": "deny", "action": "DENY", "rules": [{}]}]}
        settings.l7_config.write_text(yaml.safe_dump(deny_all))
        after = before
        for _ in range(50):
            await asyncio.sleep(0.1)
            after = (await client.exchange(get("/v2/x"))).status
            if after != before:
                break
        watcher.cancel()
        return before, after

    assert in_lab(tmp_path, scenario) == (200, 403)


def test_connection_records_name_the_tunnel_and_the_endpoint(tmp_path: Path) -> None:
    lab_port: list[int] = []

    async def scenario(lab: WaypointLab) -> tuple[list[Any], tuple[str, int]]:
        lab_port.append(lab.waypoint.hbone.address[1])
        client = await lab.http()
        assert (await client.exchange(get("/v2/x"))).status == 200
        with contextlib.suppress(HboneError):
            await lab.connect(vip="10.9.9.9:80")  # not a service of the mesh: 400
        admin = lab.waypoint.address("admin")
        reader, writer = await asyncio.open_connection(*admin)
        writer.write(b"GET /connections HTTP/1.1\r\n\r\n")
        body = (await reader.read()).partition(b"\r\n\r\n")[2]
        writer.close()
        return json.loads(body)["connections"], admin

    records, admin = in_lab(tmp_path, scenario)
    assert admin[0] == "127.0.0.1"
    tunnel, refused = records
    assert tunnel["proxy"] == "waypoint" and tunnel["path"] == "l7"
    assert tunnel["listener"] == lab_port[0] and tunnel["direction"] == "inbound"
    assert (tunnel["src_identity"], tunnel["dst_identity"]) == (CLIENT.uri, WAYPOINT.uri)
    assert tunnel["connect_target"] == REVIEWS_VIP and tunnel["upstream"] is not None
    assert tunnel["upstream"].startswith("127.0.0.1:")  # the lab's endpoint HBONE server
    assert (refused["verdict"], refused["connect_target"]) == ("deny", "10.9.9.9:80")
    assert refused["closed"] is not None


def test_envoy_request_and_response_headers(tmp_path: Path) -> None:
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async def scenario(lab: WaypointLab) -> tuple[HttpResponse, HttpResponse]:
        client = await lab.http()
        fresh = await client.exchange(get("/reviews", traceparent=trace))
        kept = await client.exchange(
            get("/reviews", **{"x-request-id": "abc", "x-forwarded-for": "192.0.2.7"})
        )
        return fresh, kept

    fresh, kept = in_lab(tmp_path, scenario)
    echoed = dict(fresh.headers)
    assert len(echoed["x-echo-x-request-id"]) == 36  # a UUID made by the waypoint
    assert echoed["x-echo-x-forwarded-proto"] == "http"
    assert echoed["x-echo-x-forwarded-for"] == CLIENT_ADDRESS[0]
    assert echoed["x-echo-traceparent"] == trace  # propagated unchanged
    assert int(echoed["x-envoy-upstream-service-time"]) >= 0
    again = dict(kept.headers)
    assert again["x-echo-x-request-id"] == "abc"
    assert again["x-echo-x-forwarded-for"] == f"192.0.2.7, {CLIENT_ADDRESS[0]}"
