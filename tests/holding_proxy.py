"""A loopback TCP proxy in front of an image server that holds chosen requests until the test releases them.

A slow image server, made exact: the request whose first line contains ``hold`` waits at the proxy
(``held`` is set) until ``release()``, whatever the wall clock says, so a test can check what other
users get meanwhile without guessing a delay. Each request gets its own upstream connection
(``Connection: close`` is forced), so every request line passes the check.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["HoldingProxy", "holding_proxy"]

_HEAD_END = b"\r\n\r\n"


def _close_after(head: bytes) -> bytes:
    """The request head with ``Connection: close`` instead of any connection header."""
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines[:1], b"Connection: close", *lines[1:]])


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class HoldingProxy:
    """Forwards ``127.0.0.1:port`` to ``upstream_port``; see the module docstring."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.hold = ""
        self.held = threading.Event()
        self._released = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def hold_requests(self, fragment: str) -> None:
        """Hold every request whose request line contains ``fragment`` until :meth:`release`."""
        self.held.clear()
        self._released.clear()
        self.hold = fragment

    def release(self) -> None:
        self.hold = ""
        self._released.set()

    def close(self) -> None:
        self.release()
        self._listener.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            head = b""
            while _HEAD_END not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            head, rest = head.split(_HEAD_END, 1)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            if self.hold and self.hold in request_line:
                self.held.set()
                self._released.wait()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                return  # the image server is down: the client sees the connection closed
            with upstream:
                upstream.sendall(_close_after(head) + _HEAD_END + rest)
                back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
                back.start()
                _pipe(client, upstream)
                back.join()


@contextmanager
def holding_proxy(upstream_port: int) -> Iterator[HoldingProxy]:
    proxy = HoldingProxy(upstream_port)
    try:
        yield proxy
    finally:
        proxy.close()
