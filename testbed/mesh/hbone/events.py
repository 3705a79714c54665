"""What `HboneProtocol.receive_data` reports: one dataclass per thing that happened."""

from __future__ import annotations

from dataclasses import dataclass

Headers = list[tuple[str, str]]


@dataclass(slots=True)
class _StreamEvent:
    """Something that happened on one stream."""

    stream_id: int


@dataclass(slots=True)
class _HeadersEvent(_StreamEvent):
    headers: Headers
    end_stream: bool


@dataclass(slots=True)
class RequestReceived(_HeadersEvent):
    """A client opened `stream_id` (server side); `end_stream` if it sent nothing more."""


@dataclass(slots=True)
class ResponseReceived(_HeadersEvent):
    """The server answered `stream_id` (client side)."""


@dataclass(slots=True)
class DataReceived(_StreamEvent):
    """Payload for `stream_id`: a view into the buffer given to `receive_data` (no copy).

    Tell the protocol with `consumed(stream_id, len(data))` once the bytes left our buffers;
    that is what returns the stream's flow-control credit."""

    data: memoryview


@dataclass(slots=True)
class StreamEnded(_StreamEvent):
    """The peer half-closed `stream_id` (END_STREAM)."""


@dataclass(slots=True)
class StreamReset(_StreamEvent):
    """The peer reset `stream_id` (RST_STREAM with `code`), or we did: its response headers
    were over our limit (PROTOCOL_ERROR)."""

    code: int


@dataclass(slots=True)
class WindowOpened(_StreamEvent):
    """Send credit grew: for `stream_id`, or for every stream when it is 0."""


@dataclass(slots=True)
class ConnectionTerminated:
    """The peer sent GOAWAY: no new streams on this connection."""

    code: int
    last_stream_id: int


@dataclass(slots=True)
class PingAcknowledged:
    """Our keepalive PING was answered: call `keepalive(now)` to schedule the next one."""


Event = (
    RequestReceived
    | ResponseReceived
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowOpened
    | ConnectionTerminated
    | PingAcknowledged
)
