"""A TCP proxy in front of a front, for tests that break the path between a client and it: each
connection is served in threads of its own (``serve``), by default passing bytes both ways until
either side closes. Subclasses change what one connection does (lose an answer, stall)."""

from __future__ import annotations

import contextlib
import socket
import threading

import httpx


class TcpProxy:
    def __init__(self, upstream: str) -> None:
        url = httpx.URL(upstream)
        self.upstream = (url.host, url.port or 80)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.serve, args=(client, self.connections), daemon=True).start()

    def serve(self, client: socket.socket, number: int) -> None:
        """Connection ``number`` (from 1): passed on both ways."""
        upstream = socket.create_connection(self.upstream)
        threading.Thread(target=self.pipe, args=(client, upstream), daemon=True).start()
        self.pipe(upstream, client)

    def pipe(
        self, source: socket.socket, sink: socket.socket, dropping: threading.Event | None = None
    ) -> None:
        """``source``'s bytes to ``sink`` until either closes (dropped once ``dropping`` is set)."""
        try:
            while data := source.recv(65536):
                if dropping is None or not dropping.is_set():
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
