"""What `HboneProtocol.receive_data` reports: one dataclass per thing that happened."""

from __future__ import annotations

from dataclasses import dataclass

Headers = list[tuple[str, str]]


@dataclass(slots=True)
class RequestReceived:
    """A client opened `stream_id` (server side); `end_stream` if it sent nothing more."""

    stream_id: int
    headers: Headers
    end_stream: bool


@dataclass(slots=True)
class ResponseReceived:
    """The server answered `stream_id` (client side)."""

    stream_id: int
    headers: Headers
    end_stream: bool


@dataclass(slots=True)
class DataReceived:
    """Payload for `stream_id`: a view into the buffer given to `receive_data` (no copy).

    Tell the protocol with `consumed(stream_id, len(data))` once the bytes left our buffers;
    that is what returns the stream's flow-control credit."""

    stream_id: int
    data: memoryview


@dataclass(slots=True)
class StreamEnded:
    """The peer half-closed `stream_id` (END_STREAM)."""

    stream_id: int


@dataclass(slots=True)
class StreamReset:
    """The peer reset `stream_id` (RST_STREAM with `code`)."""

    stream_id: int
    code: int


@dataclass(slots=True)
class WindowOpened:
    """Send credit grew: for `stream_id`, or for every stream when it is 0."""

    stream_id: int


@dataclass(slots=True)
class ConnectionTerminated:
    """The peer sent GOAWAY: no new streams on this connection."""

    code: int
    last_stream_id: int


Event = (
    RequestReceived
    | ResponseReceived
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowOpened
    | ConnectionTerminated
)
