"""Playbook tests of the sans-I/O HBONE protocol: bytes in, events and bytes out, no sockets."""

from __future__ import annotations

import hashlib
import os
import random

import h2.config
import h2.connection
import h2.events
import hpack
import pytest

from testbed.mesh.hbone import events as ev
from testbed.mesh.hbone import frames as fr
from testbed.mesh.hbone.flow import StreamReceiver
from testbed.mesh.hbone.protocol import HboneProtocol, PeerUnresponsive, Settings

REQUEST = [(":method", "CONNECT"), (":authority", "10.0.0.7:8080")]
OK = [(":status", "200")]


def frames_in(data: bytes, server_bound: bool = False) -> list[fr.Event]:
    """Decode `data` with the frame parser (our own framing is tested against hyperframe)."""
    parser = fr.FrameParser(fr.MAX_ALLOWED_FRAME_SIZE, expect_preface=server_bound)
    return parser.feed(memoryview(data))


def control(data: bytes, ftype: int, server_bound: bool = False) -> list[fr.ControlFrame]:
    found = frames_in(data, server_bound)
    return [f for f in found if isinstance(f, fr.ControlFrame) and f.ftype == ftype]


def window_updates(data: bytes) -> dict[int, int]:
    """stream id -> summed increments of the WINDOW_UPDATEs in `data`."""
    total: dict[int, int] = {}
    for f in control(data, fr.WINDOW_UPDATE):
        total[f.stream_id] = total.get(f.stream_id, 0) + fr.parse_window_increment(f.payload)
    return total


class Pair:
    """A client and a server protocol object wired back to back in memory."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.client = HboneProtocol(client_side=True, settings=settings)
        self.server = HboneProtocol(client_side=False, settings=settings)
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.to_server(), self.to_client()
        self.to_server(), self.to_client()  # the SETTINGS acks

    def to_server(self) -> list[ev.Event]:
        return self.server.receive_data(self.client.data_to_send())

    def to_client(self) -> list[ev.Event]:
        return self.client.receive_data(self.server.data_to_send())

    def connect(self) -> int:
        stream_id = self.client.open_stream(REQUEST)
        assert self.to_server() == [ev.RequestReceived(stream_id, REQUEST, False)]
        self.server.send_headers(stream_id, OK, end_stream=False)
        assert self.to_client() == [ev.ResponseReceived(stream_id, OK, False)]
        return stream_id


def payload_of(events: list[ev.Event]) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, ev.DataReceived))


# -- the connection preface and the CONNECT handshake --------------------------------------
def announced_settings(out: bytes, server_bound: bool) -> list[tuple[int, int]]:
    """The (id, value) pairs of the one SETTINGS frame in `out`, in the order sent."""
    (settings,) = control(out, fr.SETTINGS, server_bound=server_bound)
    return [(settings.payload[i] << 8 | settings.payload[i + 1],
             int.from_bytes(settings.payload[i + 2 : i + 6], "big"))
            for i in range(0, len(settings.payload), 6)]  # fmt: skip


def test_client_announces_istios_settings_and_connection_window() -> None:
    client = HboneProtocol(client_side=True)
    client.initiate_connection()
    out = client.data_to_send()
    assert out.startswith(fr.PREFACE)
    # ztunnel's h2 client: no push, 4 MiB stream window, 1 MiB frames, 16 KiB of headers
    assert announced_settings(out, server_bound=True) == [
        (fr.SETTINGS_ENABLE_PUSH, 0),
        (fr.SETTINGS_INITIAL_WINDOW_SIZE, 4 << 20),
        (fr.SETTINGS_MAX_FRAME_SIZE, 1 << 20),
        (fr.SETTINGS_MAX_HEADER_LIST_SIZE, 16 << 10),
    ]
    (update,) = control(out, fr.WINDOW_UPDATE, server_bound=True)
    assert fr.parse_window_increment(update.payload) == (16 << 20) - fr.DEFAULT_WINDOW_SIZE


def test_server_announces_istios_settings_and_connection_window() -> None:
    server = HboneProtocol(client_side=False)
    server.initiate_connection()
    out = server.data_to_send()
    # ztunnel's h2 server: 200 streams, 4 MiB stream window, 1 MiB frames, 64 KiB of headers
    assert announced_settings(out, server_bound=False) == [
        (fr.SETTINGS_MAX_CONCURRENT_STREAMS, 200),
        (fr.SETTINGS_INITIAL_WINDOW_SIZE, 4 << 20),
        (fr.SETTINGS_MAX_FRAME_SIZE, 1 << 20),
        (fr.SETTINGS_MAX_HEADER_LIST_SIZE, 64 << 10),
    ]
    (update,) = control(out, fr.WINDOW_UPDATE)
    assert fr.parse_window_increment(update.payload) == (16 << 20) - fr.DEFAULT_WINDOW_SIZE


def test_server_acks_settings_and_applies_them() -> None:
    server = HboneProtocol(client_side=False)
    server.initiate_connection()
    server.data_to_send()
    settings = fr.settings_frame({fr.SETTINGS_MAX_FRAME_SIZE: 1 << 20})
    assert server.receive_data(fr.PREFACE + settings) == [ev.WindowOpened(0)]
    assert control(server.data_to_send(), fr.SETTINGS)[0].flags == fr.FLAG_ACK
    assert server.peer_max_frame == 1 << 20


def test_connect_request_and_response() -> None:
    pair = Pair()
    stream_id = pair.connect()
    assert stream_id == 1
    assert pair.client.open_stream(REQUEST) == 3  # client streams are odd and increasing


def test_a_rejection_ends_the_stream_and_late_data_is_dropped() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream(REQUEST)
    pair.to_server()
    pair.server.send_headers(stream_id, [(":status", "401")], end_stream=True)
    pair.server.forget_stream(stream_id)
    events = pair.to_client()
    assert events == [
        ev.ResponseReceived(stream_id, [(":status", "401")], True),
        ev.StreamEnded(stream_id),
    ]
    assert pair.client.send_data(stream_id, b"late") == 4
    assert pair.to_server() == []  # the server forgot the stream: nothing reported
    assert stream_id not in pair.server.streams


def test_interop_with_the_h2_library_as_client() -> None:
    config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    client = h2.connection.H2Connection(config)
    client.initiate_connection()
    stream_id = client.get_next_available_stream_id()
    client.send_headers(stream_id, REQUEST)
    client.send_data(stream_id, b"hello")
    server = HboneProtocol(client_side=False)
    server.initiate_connection()
    events = server.receive_data(client.data_to_send())
    assert ev.RequestReceived(stream_id, REQUEST, False) in events
    assert payload_of(events) == b"hello"
    server.send_headers(stream_id, OK, end_stream=False)
    server.send_data(stream_id, b"world")
    server.end_stream(stream_id)
    answers = client.receive_data(server.data_to_send())
    (response,) = [e for e in answers if isinstance(e, h2.events.ResponseReceived)]
    assert dict(response.headers or [])[b":status"] == b"200"
    data = [e.data for e in answers if isinstance(e, h2.events.DataReceived)]
    assert b"".join(data) == b"world"
    assert any(isinstance(e, h2.events.StreamEnded) for e in answers)


# -- data, half-close and resets -----------------------------------------------------------
def test_data_both_ways_then_half_closes_end_the_stream() -> None:
    pair = Pair()
    stream_id = pair.connect()
    assert pair.client.send_data(stream_id, b"ping") == 4
    assert payload_of(pair.to_server()) == b"ping"
    pair.client.end_stream(stream_id)
    assert pair.to_server() == [ev.StreamEnded(stream_id)]
    assert pair.server.send_data(stream_id, b"pong") == 4  # the other direction stays open
    pair.server.end_stream(stream_id)
    assert pair.to_client() == [ev.DataReceived(stream_id, memoryview(b"pong")), ev.StreamEnded(1)]
    assert pair.client.streams == {} and pair.server.streams == {}


def test_data_from_headroom_is_framed_in_place() -> None:
    pair = Pair()
    stream_id = pair.connect()
    buffer = bytearray(fr.HEADER_SIZE) + bytearray(b"in place")
    assert pair.client.send_data_from_headroom(stream_id, buffer, 8) == 8
    chunks = pair.client.chunks_to_send()
    assert isinstance(chunks[-1], memoryview) and chunks[-1].obj is buffer  # not copied
    assert payload_of(pair.server.receive_data(b"".join(chunks))) == b"in place"


def test_reset_reaches_the_peer_and_later_frames_are_dropped() -> None:
    pair = Pair()
    stream_id = pair.connect()
    pair.client.reset_stream(stream_id)
    assert pair.to_server() == [ev.StreamReset(stream_id, fr.CONNECT_ERROR)]
    late = fr.frame(fr.DATA, 0, stream_id, b"x" * 1000)
    assert pair.client.receive_data(late) == []
    assert pair.client.sendable(stream_id) == 0


def test_goaway_stops_new_streams() -> None:
    pair = Pair()
    pair.connect()
    pair.server.close()
    assert pair.to_client() == [ev.ConnectionTerminated(fr.NO_ERROR, 1)]
    assert not pair.client.can_open_stream()


def test_ping_is_answered() -> None:
    pair = Pair()
    assert pair.server.receive_data(fr.frame(fr.PING, 0, 0, b"12345678")) == []
    (ack,) = control(pair.server.data_to_send(), fr.PING)
    assert ack.flags == fr.FLAG_ACK and ack.payload == b"12345678"


# -- limits we announce are enforced, the peer's are honoured ------------------------------
def test_the_server_refuses_a_stream_beyond_its_200() -> None:
    pair = Pair()
    ids = [pair.client.open_stream(REQUEST) for _ in range(200)]
    assert not pair.client.can_open_stream()  # the client honours the server's 200
    events = pair.to_server()
    assert [e.stream_id for e in events if isinstance(e, ev.RequestReceived)] == ids
    extra = pair.client.open_stream(REQUEST)  # a client ignoring the limit
    assert pair.to_server() == []
    refusal = pair.server.data_to_send()
    (reset,) = control(refusal, fr.RST_STREAM)
    assert (reset.stream_id, fr.parse_u32(reset.payload, "")) == (extra, fr.REFUSED_STREAM)
    assert pair.client.receive_data(refusal) == [ev.StreamReset(extra, fr.REFUSED_STREAM)]
    pair.server.reset_stream(ids[0])  # one ends: there is room again
    pair.client.receive_data(pair.server.data_to_send())
    assert pair.client.can_open_stream()
    again = pair.client.open_stream(REQUEST)
    assert pair.to_server() == [ev.RequestReceived(again, REQUEST, False)]


def test_the_client_honours_a_smaller_stream_limit_and_the_server_enforces_it() -> None:
    pair = Pair()
    pair.server = HboneProtocol(
        client_side=False, settings=Settings.server(max_concurrent_streams=2)
    )
    pair.client = HboneProtocol(client_side=True)
    for side in (pair.client, pair.server):
        side.initiate_connection()
    pair.to_server(), pair.to_client(), pair.to_server(), pair.to_client()
    first, second = pair.connect(), pair.connect()
    assert not pair.client.can_open_stream()
    third = pair.client.open_stream(REQUEST)
    assert pair.to_server() == []
    assert pair.to_client() == [ev.StreamReset(third, fr.REFUSED_STREAM)]
    assert sorted(pair.server.streams) == [first, second]


BIG = [("x-big", "a" * (64 << 10))]  # 64 KiB + 37 bytes by the RFC's measure


def test_a_request_over_the_header_limit_gets_431_and_a_reset() -> None:
    pair = Pair()
    refused = pair.client.open_stream([*REQUEST, *BIG])
    assert pair.to_server() == []  # the app never sees it
    out = pair.server.data_to_send()
    (answer,) = control(out, fr.HEADERS)
    assert answer.flags & fr.FLAG_END_STREAM
    (reset,) = control(out, fr.RST_STREAM)
    assert (reset.stream_id, fr.parse_u32(reset.payload, "")) == (refused, fr.PROTOCOL_ERROR)
    events = pair.client.receive_data(out)
    assert events[0] == ev.ResponseReceived(refused, [(":status", "431")], True)
    assert pair.connect() == refused + 2  # the connection (and its HPACK state) lives on


def test_a_response_over_the_client_header_limit_resets_the_stream() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream(REQUEST)
    pair.to_server()
    pair.server.send_headers(stream_id, [*OK, ("x-big", "b" * (16 << 10))], end_stream=False)
    assert pair.to_client() == [ev.StreamReset(stream_id, fr.PROTOCOL_ERROR)]
    assert pair.to_server() == [ev.StreamReset(stream_id, fr.PROTOCOL_ERROR)]
    assert pair.connect() == stream_id + 2


def test_a_header_list_far_over_the_limit_is_not_decoded() -> None:
    pair = Pair()
    bomb = hpack.Encoder().encode([*REQUEST, ("x-bomb", "c" * (300 << 10))], huffman=False)
    with pytest.raises(fr.FrameError) as failure:
        pair.server.receive_data(fr.headers_frames(1, bomb, False, 1 << 20))
    assert failure.value.code == fr.COMPRESSION_ERROR


def test_continuation_past_the_header_limit_fails_the_connection() -> None:
    pair = Pair()
    piece = b"\x00" * (40 << 10)
    frames = fr.frame(fr.HEADERS, 0, 1, piece) + fr.frame(fr.CONTINUATION, 0, 1, piece)
    with pytest.raises(fr.FrameError) as failure:
        pair.server.receive_data(frames)
    assert failure.value.code == fr.COMPRESSION_ERROR


# -- PING keepalive: time passed in, Istio's 10 s interval and 20 s timeout ----------------
def pings(data: bytes) -> list[fr.ControlFrame]:
    return [f for f in control(data, fr.PING) if not f.flags & fr.FLAG_ACK]


@pytest.mark.parametrize("side", ["client", "server"])
def test_keepalive_pings_10s_after_start_and_after_each_ack(side: str) -> None:
    pair = Pair()
    us, peer = (pair.client, pair.server) if side == "client" else (pair.server, pair.client)
    assert us.keepalive(100.0) == 110.0  # the first PING waits an interval
    assert us.keepalive(105.0) == 110.0 and pings(us.data_to_send()) == []  # early: nothing
    assert us.keepalive(110.0) == 130.0  # sent; the ACK is due within 20 s
    sent = us.data_to_send()
    (ping,) = pings(sent)
    assert peer.receive_data(sent) == []
    assert us.receive_data(peer.data_to_send()) == [ev.PingAcknowledged()]
    assert us.keepalive(112.5) == 122.5  # the next one 10 s after the ACK
    assert us.keepalive(122.5) == 142.5
    assert pings(us.data_to_send())[0].payload != ping.payload  # a fresh opaque value


def test_no_ack_within_20s_declares_the_peer_dead_with_goaway_no_error() -> None:
    pair = Pair()
    pair.client.keepalive(0.0)
    pair.client.keepalive(10.0)
    pair.client.data_to_send()  # the PING is lost: the peer is frozen
    assert pair.client.keepalive(29.9) == 30.0  # traffic does not count, only the ACK
    with pytest.raises(PeerUnresponsive):
        pair.client.keepalive(30.0)
    (goaway,) = control(pair.client.data_to_send(), fr.GOAWAY)
    assert fr.parse_goaway(goaway.payload)[1] == fr.NO_ERROR
    assert pair.client.keepalive(31.0) is None  # closed: no more timers


@pytest.mark.parametrize("silent_from", [0.0, 9.99, 10.0, 10.5, 25.0, 31.7, 40.0])
def test_with_istios_defaults_a_peer_gone_silent_is_dead_within_30s(silent_from: float) -> None:
    pair = Pair()
    now, due = 0.0, pair.client.keepalive(0.0)
    try:
        while due is not None:
            now = due
            due = pair.client.keepalive(now)
            sent = pair.client.data_to_send()
            if now < silent_from:  # the peer answers (at once) until it goes silent
                pair.server.receive_data(sent)
                if pair.client.receive_data(pair.server.data_to_send()):
                    due = pair.client.keepalive(now)
    except PeerUnresponsive:
        assert silent_from < now <= silent_from + 30.0
    else:
        raise AssertionError("never declared dead")


def test_a_stale_or_foreign_ping_ack_does_not_count() -> None:
    pair = Pair()
    pair.client.keepalive(0.0)
    pair.client.keepalive(10.0)
    pair.client.data_to_send()
    assert pair.client.receive_data(fr.ping_ack(b"\x00" * 8)) == []
    with pytest.raises(PeerUnresponsive):
        pair.client.keepalive(30.0)


def test_keepalive_intervals_are_settings_and_can_be_off() -> None:
    fast = HboneProtocol(
        client_side=True, settings=Settings.client(ping_interval=0.2, ping_timeout=0.5)
    )
    assert fast.keepalive(1.0) == 1.2
    assert fast.keepalive(1.2) == 1.7
    off = HboneProtocol(client_side=True, settings=Settings.client(ping_interval=None))
    assert off.keepalive(1.0) is None


# -- the peer breaking the rules: one GOAWAY with the code, then FrameError ----------------
@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (fr.frame(fr.HEADERS, fr.FLAG_END_HEADERS, 2, b""), fr.PROTOCOL_ERROR),  # even id
        (fr.frame(fr.PUSH_PROMISE, 0, 1, b"\x00\x00\x00\x02"), fr.PROTOCOL_ERROR),
        (fr.frame(fr.HEADERS, fr.FLAG_END_HEADERS, 1, b"\xff\xff\xff"), fr.COMPRESSION_ERROR),
        (fr.frame(fr.HEADERS, 0, 1, b"") + fr.frame(fr.PING, 0, 0, b"8" * 8), fr.PROTOCOL_ERROR),
        (fr.window_update(0, fr.MAX_WINDOW_SIZE), fr.FLOW_CONTROL_ERROR),
        (fr.frame(fr.WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"), fr.PROTOCOL_ERROR),
        (fr.frame(fr.GOAWAY, 0, 0, b"\x00"), fr.FRAME_SIZE_ERROR),
    ],
    ids=["even-stream", "push", "bad-hpack", "no-continuation", "window-overflow", "zero-inc",
         "short-goaway"],
)  # fmt: skip
def test_rule_breaking_gets_goaway_with_its_code(frame: bytes, code: int) -> None:
    pair = Pair()
    with pytest.raises(fr.FrameError) as failure:
        pair.server.receive_data(frame)
    assert failure.value.code == code
    (goaway,) = control(pair.server.data_to_send(), fr.GOAWAY)
    assert fr.parse_goaway(goaway.payload)[1] == code


def test_overrunning_the_stream_window_is_a_flow_control_error() -> None:
    pair = Pair()
    stream_id = pair.connect()
    too_much = fr.frame(fr.DATA, 0, stream_id, b"x" * (1 << 20))
    with pytest.raises(fr.FrameError) as failure:
        for _ in range(9):  # window 4 MiB + buffer limit 4 MiB, never read: the 9th overruns
            pair.client.receive_data(too_much)
            pair.client.data_to_send()
    assert failure.value.code == fr.FLOW_CONTROL_ERROR


# -- flow control through the pair ---------------------------------------------------------
def pump(pair: Pair, stream_id: int, source: bytearray, read: bool, received: bytearray) -> int:
    """Server -> client until the windows stop it; the client app reads if `read`."""
    moved = 0
    while source and (sent := pair.server.send_data(stream_id, bytes(source[: 1 << 20]))):
        del source[:sent]
        moved += sent
        for event in pair.to_client():
            if isinstance(event, ev.DataReceived):
                received += event.data
                if read:
                    pair.client.consumed(stream_id, len(event.data))
        pair.to_server()  # WINDOW_UPDATEs back
    return moved


def test_a_stalled_app_bounds_memory_and_a_resumed_one_completes_the_transfer() -> None:
    pair = Pair()
    stream_id = pair.connect()
    payload = os.urandom(40 << 20)
    source, received = bytearray(payload), bytearray()
    pump(pair, stream_id, source, read=False, received=received)
    receiver = pair.client.streams[stream_id].receive
    assert receiver.buffered == len(received) <= (4 << 20) + (4 << 20)  # window + buffer limit
    assert pair.server.sendable(stream_id) == 0  # the sender waits: nothing more comes
    pair.client.consumed(stream_id, receiver.buffered)  # the app reads everything it has
    pair.to_server()
    assert pair.server.sendable(stream_id) > 0
    pump(pair, stream_id, source, read=True, received=received)
    assert not source
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_credit_is_early_and_batched_into_the_flush() -> None:
    pair = Pair()
    stream_id = pair.connect()
    small = b"".join(fr.frame(fr.DATA, 0, stream_id, b"y" * 4096) for _ in range(256))
    events = pair.client.receive_data(small)  # 1 MiB in 256 frames, the app has not read yet
    assert len(events) == 256
    # within the buffer limit the stream is credited before the app reads, in one update for
    # the whole batch rather than one per frame (the connection's comes per 4 MiB)
    assert window_updates(pair.client.data_to_send()) == {stream_id: 1 << 20}


# -- the receive window alone --------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_stream_receiver_never_lets_the_peer_exceed_window_plus_buffer(seed: int) -> None:
    rng = random.Random(seed)
    window, limit = 1 << 16, 1 << 15
    receiver = StreamReceiver(window, limit, threshold=1 << 12)
    peer_credit = window  # what the peer believes it may still send
    for _ in range(2000):
        if rng.random() < 0.6 and peer_credit:
            length = rng.randint(1, peer_credit)
            receiver.receive(length)
            peer_credit -= length
        elif receiver.buffered:
            receiver.consume(rng.randint(1, receiver.buffered))
        peer_credit += receiver.credit()
        assert receiver.buffered <= window + limit
        assert peer_credit == receiver.available  # the peer never gets more than granted


def test_stream_receiver_never_stalls_a_reading_app() -> None:
    receiver = StreamReceiver(1 << 16, 0, threshold=1 << 14)  # no buffering beyond the window
    for _ in range(1000):
        assert receiver.available >= (1 << 16) - (1 << 14)  # always room to send
        receiver.receive(1000)
        receiver.consume(1000)
        receiver.credit()
