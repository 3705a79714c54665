"""The waypoint's downstream HTTP servers for the fuzz targets, in their own process (its
exit is a crash, its RSS is theirs alone, not the fuzzer's):

    python waypoint_server.py h1|h2   -> prints its port, serves until killed

Every request is answered 200 "ok"; the parsers and connection handling under test are
testbed.mesh.waypoint.http1.serve_http1 and http2.Http2Server.
"""

from __future__ import annotations

import asyncio
import sys

from fuzz_support import end_with_parent

from testbed.mesh.waypoint.http1 import serve_http1
from testbed.mesh.waypoint.http2 import Http2Server
from testbed.mesh.waypoint.messages import MAX_HEADER_BYTES, HttpRequest, HttpResponse


async def ok(request: HttpRequest) -> HttpResponse:
    return HttpResponse(200, [], b"ok")


async def serve_h2(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    initial = await reader.read(65536)  # the waypoint sniffs "PRI " and hands over to h2
    await Http2Server(reader, writer, ok).run(initial)


async def main(kind: str) -> None:
    if kind == "h1":
        server = await asyncio.start_server(
            lambda r, w: serve_http1(r, w, ok), "127.0.0.1", 0, limit=MAX_HEADER_BYTES
        )
    else:
        server = await asyncio.start_server(serve_h2, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    end_with_parent()
    asyncio.run(main(sys.argv[1]))
