"""What a tunneled connection speaks, from its first bytes (the client talks first in HTTP).

HTTP/2 starts with the connection preface `PRI * HTTP/2.0...`; HTTP/1.1 with a method token
and a space. Anything else is plain TCP, passed through with L4 policy only. A preface that
starts right but goes wrong is still handed to HTTP/2, whose error closes the connection.
"""

from __future__ import annotations

import re
from typing import Literal

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
Protocol = Literal["h2", "http/1.1", "tcp", "more"]
_METHOD_AND_SPACE = re.compile(rb"^[A-Z][A-Z-]{0,19} ")
_METHOD_SO_FAR = re.compile(rb"^[A-Z][A-Z-]{0,19}$")


def sniff(initial: bytes) -> Protocol:
    """The protocol of a connection that started with `initial`; "more" asks for more bytes."""
    if initial.startswith(b"PRI "):
        return "h2"
    if _METHOD_AND_SPACE.match(initial):
        return "http/1.1"
    if _METHOD_SO_FAR.match(initial):
        return "more"
    return "tcp"
