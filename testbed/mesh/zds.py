"""ZDS, the CNI agent <-> ztunnel protocol (istio/ztunnel proto/zds.proto), wire-compatible.

Messages travel over an AF_UNIX SOCK_SEQPACKET socket, one protobuf message per packet;
an Add carries the pod's netns fd as SCM_RIGHTS ancillary data. ztunnel connects and sends
ZdsHello; the agent then sends WorkloadRequests (Add/Keep for its snapshot, SnapshotSent,
then Add/Del as pods come and go) and waits for a WorkloadResponse (Ack) to each.

Only the few messages of zds.proto are encoded, by hand (proto3: default values are
omitted, unknown fields are skipped), with the field numbers of zds.proto:

    ZdsHello        { Version version = 1; }                  V1 = 1
    WorkloadInfo    { name = 1; namespace = 2; service_account = 3; }   (4 reserved)
    AddWorkload     { uid = 1; WorkloadInfo workload_info = 2; }
    KeepWorkload    { uid = 1; }
    DelWorkload     { uid = 2; }
    SnapshotSent    { }
    Ack             { error = 1; }
    WorkloadRequest { oneof: add = 1; del = 2; snapshot_sent = 3; keep = 5; }
    WorkloadResponse{ oneof: ack = 1; }
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from testbed.netlab.errors import TestbedError

ZDS_VERSION_V1 = 1
MAX_MESSAGE = 4096  # Istio reads into 1 KiB buffers; our messages are far smaller

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class ZdsDecodeError(TestbedError, ValueError):
    pass


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class WorkloadInfo:
    name: str = ""
    namespace: str = ""
    service_account: str = ""


@dataclass(frozen=True)
class AddWorkload:
    uid: str
    info: WorkloadInfo | None = None


@dataclass(frozen=True)
class KeepWorkload:
    uid: str


@dataclass(frozen=True)
class DelWorkload:
    uid: str


@dataclass(frozen=True)
class SnapshotSent:
    pass


WorkloadRequest = AddWorkload | KeepWorkload | DelWorkload | SnapshotSent


# ---------------------------------------------------------------- wire primitives


def encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("negative varints are not used by zds")
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ZdsDecodeError("varint too long")
    raise ZdsDecodeError("truncated varint")


def _key(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, _LEN) + encode_varint(len(payload)) + payload


def _str_field(number: int, text: str) -> bytes:
    return _len_field(number, text.encode()) if text else b""


def iter_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for each field; LEN values are the raw bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ZdsDecodeError("field number 0")
        value: int | bytes
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire_type == _LEN:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
            if pos > len(data):
                raise ZdsDecodeError("truncated length-delimited field")
        elif wire_type in (_I64, _I32):
            width = 8 if wire_type == _I64 else 4
            value, pos = int.from_bytes(data[pos : pos + width], "little"), pos + width
            if pos > len(data):
                raise ZdsDecodeError("truncated fixed-width field")
        else:
            raise ZdsDecodeError(f"unsupported wire type {wire_type}")
        yield number, wire_type, value


def _string(data: bytes, number: int) -> str:
    """String field `number` of a message ("" if absent; the last occurrence wins, as in
    protobuf). Only that field is decoded: other LEN fields may be nested messages."""
    values = [v for n, t, v in iter_fields(data) if n == number and isinstance(v, bytes)]
    try:
        return values[-1].decode() if values else ""
    except UnicodeDecodeError:
        raise ZdsDecodeError(f"field {number} is not valid UTF-8") from None


def _messages(data: bytes) -> list[tuple[int, bytes]]:
    return [(n, v) for n, t, v in iter_fields(data) if t == _LEN and isinstance(v, bytes)]


# ---------------------------------------------------------------- hello and ack


def encode_hello(version: int = ZDS_VERSION_V1) -> bytes:
    return _key(1, _VARINT) + encode_varint(version) if version else b""


def decode_hello(data: bytes) -> int:
    versions = [v for n, t, v in iter_fields(data) if n == 1 and t == _VARINT]
    return int(versions[-1]) if versions else 0


def encode_ack(error: str = "") -> bytes:
    """WorkloadResponse{ack: Ack{error}}; an empty error means success."""
    return _len_field(1, _str_field(1, error))


def decode_ack(data: bytes) -> str:
    acks = [payload for number, payload in _messages(data) if number == 1]
    if not acks:
        raise ZdsDecodeError("WorkloadResponse without an ack")
    return _string(acks[-1], 1)


# ---------------------------------------------------------------- workload requests


def _encode_info(info: WorkloadInfo) -> bytes:
    return (
        _str_field(1, info.name)
        + _str_field(2, info.namespace)
        + _str_field(3, info.service_account)
    )


def encode_request(request: WorkloadRequest) -> bytes:
    if isinstance(request, AddWorkload):
        info = b"" if request.info is None else _len_field(2, _encode_info(request.info))
        return _len_field(1, _str_field(1, request.uid) + info)
    if isinstance(request, DelWorkload):
        return _len_field(2, _str_field(2, request.uid))
    if isinstance(request, SnapshotSent):
        return _len_field(3, b"")
    return _len_field(5, _str_field(1, request.uid))


def _decode_add(payload: bytes) -> AddWorkload:
    infos = [body for number, body in _messages(payload) if number == 2]
    info = None
    if infos:
        info = WorkloadInfo(*(_string(infos[-1], number) for number in (1, 2, 3)))
    return AddWorkload(_string(payload, 1), info)


def decode_request(data: bytes) -> WorkloadRequest:
    payloads = [(n, body) for n, body in _messages(data) if n in (1, 2, 3, 5)]
    if not payloads:
        raise ZdsDecodeError("WorkloadRequest without a known payload")
    number, body = payloads[-1]  # oneof: the last one on the wire wins
    if number == 1:
        return _decode_add(body)
    if number == 2:
        return DelWorkload(_string(body, 2))
    if number == 3:
        return SnapshotSent()
    return KeepWorkload(_string(body, 1))


# ---------------------------------------------------------------- packets with fds


def send_packet(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """One SEQPACKET message, with `fds` as SCM_RIGHTS."""
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def recv_packet(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the fds that came with it; b"" means the peer closed."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, 4)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            socket.close(fd)
        raise ZdsDecodeError("truncated zds message")
    return data, fds
