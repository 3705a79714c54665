"""HTTP/1.1 message heads and body framing (RFC 9112), pure and socket-free.

The waypoint parses every request and response it relays; a general library (h11) cost about
half of its CPU, so the few rules a proxy needs are here: strict request and status lines,
token header names, no obsolete line folding, one consistent Content-Length, chunked only
as the sole transfer coding. Anything else is a ParseError carrying the status to answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from testbed.netlab.errors import TestbedError

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([^ \x00-\x1f\x7f]+) HTTP/(1\.[01])")
_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([1-9][0-9]{2})(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
_HEADER = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?")

Headers = list[tuple[str, str]]
Framing = Literal["none", "length", "chunked", "close"]


class ParseError(TestbedError, ValueError):
    """A malformed message; `status` is what a server answers (400, 431, 501...)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    version: str  # "1.1" or "1.0"
    headers: Headers  # lowercase names, in order

    @property
    def keep_alive(self) -> bool:
        return keep_alive(self.version, self.headers)


@dataclass(frozen=True)
class ResponseHead:
    version: str
    status: int
    headers: Headers


def _lines(head: bytes) -> list[bytes]:
    text = head.removesuffix(b"\r\n\r\n").lstrip(b"\r\n")  # empty lines may precede a request
    lines = text.split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise ParseError("bare CR or LF in the message head")
    return lines


def _headers(lines: list[bytes]) -> Headers:
    headers = []
    for line in lines:
        match = _HEADER.fullmatch(line)
        if match is None:
            raise ParseError(f"malformed header line {line[:40]!r}")
        headers.append((match[1].decode("ascii").lower(), match[2].decode("latin-1")))
    return headers


def parse_request_head(head: bytes) -> RequestHead:
    """A request head up to and including the empty line."""
    request_line, *header_lines = _lines(head)
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        raise ParseError(f"malformed request line {request_line[:60]!r}")
    headers = _headers(header_lines)
    version = match[3].decode("ascii")
    if version == "1.1" and sum(1 for name, _ in headers if name == "host") != 1:
        raise ParseError("an HTTP/1.1 request needs exactly one Host header")
    return RequestHead(match[1].decode("ascii"), match[2].decode("latin-1"), version, headers)


def parse_response_head(head: bytes) -> ResponseHead:
    status_line, *header_lines = _lines(head)
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise ParseError(f"malformed status line {status_line[:60]!r}", 502)
    return ResponseHead(match[1].decode("ascii"), int(match[2]), _headers(header_lines))


def _tokens(headers: Headers, name: str) -> list[str]:
    return [
        token.strip().lower()
        for key, value in headers
        if key == name
        for token in value.split(",")
        if token.strip()
    ]


def keep_alive(version: str, headers: Headers) -> bool:
    tokens = _tokens(headers, "connection")
    if "close" in tokens:
        return False
    return version == "1.1" or "keep-alive" in tokens


def framing(headers: Headers, *, is_request: bool) -> tuple[Framing, int]:
    """How the body is delimited: (kind, Content-Length). A request without either header
    has no body; a response without them runs until the connection closes."""
    codings = _tokens(headers, "transfer-encoding")
    lengths = {value.strip() for key, value in headers if key == "content-length"}
    if codings:
        if codings != ["chunked"]:
            raise ParseError(f"unsupported transfer coding {codings}", 501)
        if lengths:
            raise ParseError("both Transfer-Encoding and Content-Length")
        return "chunked", 0
    if len(lengths) > 1:
        raise ParseError(f"conflicting Content-Length values {sorted(lengths)}")
    if lengths:
        (text,) = lengths
        if not (text.isascii() and text.isdigit()) or len(text) > 18:  # "5³" is a digit too
            raise ParseError(f"bad Content-Length {text!r}")
        return "length", int(text)
    return ("none", 0) if is_request else ("close", 0)


def chunk_size(line: bytes) -> int:
    """The size in a chunk-size line (without its CRLF); extensions are ignored."""
    match = _CHUNK_SIZE.fullmatch(line)
    if match is None:
        raise ParseError(f"bad chunk size line {line[:40]!r}")
    return int(match[1], 16)


def encode_head(start_line: str, headers: Headers, body_length: int, close: bool) -> bytes:
    """A head with our own framing: Content-Length (and Connection: close when closing)."""
    lines = [start_line, *(f"{name}: {value}" for name, value in headers)]
    lines.append(f"content-length: {body_length}")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
