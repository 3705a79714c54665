"""A TCP server listening inside a network namespace, in this process, with a thread per
connection: the small apps that tests and fault runs place in pods (a greeting, a sha256
sink, a counter), where starting a process per app would cost more than the app."""

from __future__ import annotations

import contextlib
import socket
import threading

from testbed.netlab.netns import Netns


class NetnsTcpServer:
    """Listens on `port` in `netns` (the socket stays there once made); each accepted
    connection is handed to `serve` on a thread of its own and closed afterwards."""

    def __init__(self, netns: Netns, port: int, *, backlog: int = 128) -> None:
        self.port = port
        with netns.entered():
            self.listener = socket.create_server(("0.0.0.0", port), backlog=backlog)
        name = f"{type(self).__name__}-{netns.name}"
        threading.Thread(target=self._accept, name=name, daemon=True).start()

    def serve(self, conn: socket.socket, peer_ip: str) -> None:
        """One connection; an OSError ends it quietly (the peer went away)."""
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn, str(peer[0])), daemon=True).start()

    def _serve(self, conn: socket.socket, peer_ip: str) -> None:
        with conn, contextlib.suppress(OSError):
            self.serve(conn, peer_ip)
