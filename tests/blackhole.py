"""A TCP forwarder on 127.0.0.1 that can turn into a network blackhole on command.

Between a run and PostgreSQL, it forwards bytes both ways until :meth:`Blackhole.cut`;
from then on it forwards nothing in either direction and closes nothing, as a network
that silently drops every packet looks to both ends (a connection opened afterwards is
accepted and never answered). Only the test's own sockets are involved: no firewall rule.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def _connect(target: tuple[str, int]) -> socket.socket:
    """A connection to PostgreSQL at (host, port); a host that is a directory is libpq's
    Unix-socket form (the embedded server listens only there)."""
    host, port = target
    if host.startswith("/"):
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(f"{host}/.s.PGSQL.{port}")
        return upstream
    return socket.create_connection(target)


class Blackhole:
    """See the module docstring; build it with :func:`blackhole_proxy`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.forwarding = threading.Event()
        self.forwarding.set()
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, name="blackhole-accept", daemon=True).start()

    def cut(self) -> None:
        """Stop forwarding, both ways, for every connection, open or new."""
        self.forwarding.clear()

    def close(self) -> None:
        self.closed.set()
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            if not self.forwarding.is_set():
                continue  # accepted, never answered
            upstream = _connect(self.target)
            self.sockets.append(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), name="blackhole-pump",
                                 daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self.closed.is_set():
            if not self.forwarding.is_set():
                self.closed.wait()  # read nothing more, send nothing more, close nothing
                return
            try:
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                if self.forwarding.is_set():  # bytes that arrive after the cut are dropped
                    dst.sendall(data)
            except OSError:
                return


@contextmanager
def blackhole_proxy(host: str, port: int) -> Iterator[Blackhole]:
    proxy = Blackhole((host, port))
    try:
        yield proxy
    finally:
        proxy.close()
