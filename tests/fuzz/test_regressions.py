"""Every fuzzing finding, as a fixed input and the behaviour it must get.

Each test names the target that found it; see also tests/fuzz/corpus/ for the seeds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz_support import (
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PREFACE,
    PROTOCOL_ERROR,
    SETTINGS,
    exchange,
    h2_frame,
    h2_probe,
    h2_verdict,
)
from h2_inputs import _HPACK_GET, _hpack_literal
from test_fuzz_waypoint_h2 import WaypointH2

from testbed.cluster.loader import load_topology
from testbed.cluster.model import TopologyError, plan
from testbed.experiment.spec import SpecError, load_spec
from testbed.mesh import zds
from testbed.mesh.config import ConfigError, LocalConfig
from testbed.mesh.waypoint.h1codec import ParseError, framing, parse_request_head


@pytest.mark.parametrize(
    "packet",
    [b"\n\x03\n\x01\x80", b"\x12\x03\x12\x01\x80", b"\x0a\x06\x12\x04\x0a\x02\xc3\x28"],
    ids=["add-uid", "del-uid", "info-name"],
)
def test_zds_string_that_is_not_utf8_is_a_decode_error(packet: bytes) -> None:
    """zds: UnicodeDecodeError escaped decode_request (it is a ZdsDecodeError now)."""
    with pytest.raises(zds.ZdsDecodeError, match="not valid UTF-8"):
        zds.decode_request(packet)


def test_zds_add_with_long_names_round_trips() -> None:
    """zds-roundtrip: a WorkloadInfo over 127 bytes has a two-byte length; decoding the Add
    decoded that nested message as a string and failed."""
    add = zds.AddWorkload("u" * 200, zds.WorkloadInfo("n" * 200, "ns", "sa"))
    assert zds.decode_request(zds.encode_request(add)) == add


@pytest.fixture(scope="module")
def waypoint() -> Iterator[WaypointH2]:
    running = WaypointH2()
    yield running
    running.close()


def test_waypoint_h2_header_not_utf8_resets_only_its_stream(waypoint: WaypointH2) -> None:
    """waypoint-h2: a header value of bytes that are not UTF-8 raised UnicodeDecodeError out
    of h2 and dropped the connection without a GOAWAY; now RST_STREAM(PROTOCOL_ERROR)."""
    block = _HPACK_GET + _hpack_literal(b"x", b"\xff\xfe")
    data = (
        PREFACE
        + h2_frame(SETTINGS, 0, 0, b"")
        + h2_frame(HEADERS, END_STREAM | END_HEADERS, 1, block)
    )
    verdict = h2_verdict(exchange(waypoint.address, data + h2_probe()))
    assert verdict.reset_codes == [PROTOCOL_ERROR]
    assert verdict.ping_acked and verdict.goaway_codes == []
    assert waypoint.canary.served()


def test_zds_client_nacks_garbage_and_closes_its_fd(tmp_path: Path) -> None:
    """zds-client: an undecodable request was not answered (Istio nacks it) and the fd sent
    with it leaked; now: an Ack with the error, the fd closed, a new session."""
    from test_fuzz_zds import Agent

    agent = Agent(tmp_path / "zds.sock")
    try:
        error = agent.exchange(b"\x0b", with_fd=True)  # wire type 3: not readable
        assert error is not None and error.startswith("failure to read message")
        assert agent.session_ends_and_restarts()
        assert agent.exchange(zds.encode_request(zds.SnapshotSent()), with_fd=False) == ""
    finally:
        agent.close()


ALIAS_BOMB = b"a: &a [1,1,1,1,1,1,1,1,1]\n" + b"".join(
    b"%c: &%c [*%c,*%c,*%c,*%c,*%c,*%c,*%c,*%c,*%c]\n" % ((98 + i, 98 + i) + (97 + i,) * 9)
    for i in range(8)
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"\xff\xfe", "not UTF-8 text"),
        (b"[" * 3000, "not valid"),
        (ALIAS_BOMB + b"workloads: *i\n", "aliases are expanded"),
    ],
    ids=["not-utf8", "deep", "alias-bomb"],
)
def test_loaders_refuse_hostile_documents_with_one_error(
    tmp_path: Path, text: bytes, message: str
) -> None:
    """mesh-config, experiment-spec: these escaped as UnicodeDecodeError or RecursionError,
    or validated 9^9 aliased values for minutes; now one ConfigError / SpecError, at once."""
    path = tmp_path / "hostile.yaml"
    path.write_bytes(text)
    started = time.process_time()  # CPU, not wall: the machine is shared, load varies
    with pytest.raises(ConfigError, match=message) as config_error:
        LocalConfig.load(path)
    with pytest.raises(SpecError, match=message):
        load_spec(path)
    assert str(config_error.value).startswith(f"{path}: ")
    assert "\n" not in str(config_error.value)
    assert time.process_time() - started < 10


@pytest.mark.parametrize("value", [b"5\xb3", b"\xb2", b"\xd9\xa3"])
def test_http1_content_length_of_non_ascii_digits_is_a_400(value: bytes) -> None:
    """http1-parser (atheris): "Content-Length: 5³" passed str.isdigit() and int() raised
    ValueError out of framing(), so the waypoint dropped the connection without a 400."""
    head = parse_request_head(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + value + b"\r\n\r\n"
    )
    with pytest.raises(ParseError, match="bad Content-Length") as error:
        framing(head.headers, is_request=True)
    assert error.value.status == 400


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("multi_node,nodes=209209,pods=2", "more than 200 nodes"),
        ("multi_node,nodes=200,pods=5002", "more than 50000 pods"),
    ],
)
def test_topology_of_absurd_size_fails_at_once(spec: str, message: str) -> None:
    """topology-spec (atheris): nodes=209209 built 400k objects for 211 s and ~300 MiB
    before the size check; now the model refuses the 201st node or the 50001st pod."""
    started = time.process_time()  # CPU, not wall: the machine is shared, load varies
    with pytest.raises(TopologyError, match=message):
        plan(load_topology(spec))
    assert time.process_time() - started < 10
