"""A TCP proxy that delays every byte by a fixed time each way: a far server on loopback.

Why: on loopback a round trip costs ~0.1 ms and nobody notices how many an action makes; over
an SSH tunnel each costs the link's latency. :class:`DelayedServer` puts a ``djinn-server``
behind such a link, *both* channels: the rpyc port, and the side channel, whose port the server
announces in its replies. The proxy listens on another loopback address (``127.0.0.2``) at the
rpyc proxy's own port and at the server's side-channel port number, so a client given
``127.0.0.2:<port>`` reaches the side channel through the delay too, unchanged.

    with DelayedServer(server_address, rtt_ms=25) as address:
        client = djinn_nb.connect(address)
"""
from __future__ import annotations

import collections
import socket
import threading
import time
from typing import Any

PROXY_HOST = "127.0.0.2"  # any 127/8 address is loopback on Linux; the server binds 127.0.0.1


class _Pipe:
    """One direction of one connection: bytes read now are written ``delay`` seconds later, in order."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float):
        self.src, self.dst, self.delay = src, dst, delay
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = threading.Condition()
        self.closed = False
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(1 << 20)
                if not data:
                    break
                with self.ready:
                    self.queue.append((time.monotonic() + self.delay, data))
                    self.ready.notify()
        except OSError:
            pass
        with self.ready:
            self.closed = True
            self.ready.notify()

    def _write(self) -> None:
        try:
            while True:
                with self.ready:
                    while not self.queue and not self.closed:
                        self.ready.wait()
                    if not self.queue:
                        break
                    due, data = self.queue.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.dst.sendall(data)
        except OSError:
            pass
        for s in (self.dst, self.src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Forward:
    """Listen on ``(PROXY_HOST, port)``; each connection goes to ``upstream`` through two pipes."""

    def __init__(self, port: int, upstream: tuple[str, int], delay: float):
        self.upstream, self.delay = upstream, delay
        self.sock = socket.create_server((PROXY_HOST, port))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
                server = socket.create_connection(self.upstream)
            except OSError:
                return
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns += [client, server]
            _Pipe(client, server, self.delay)
            _Pipe(server, client, self.delay)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept (closing alone leaves the port bound)
        except OSError:
            pass
        self.sock.close()
        for s in self.conns:
            try:
                s.close()
            except OSError:
                pass


class DelayedServer:
    """A server at ``address`` ("127.0.0.1:port", side channel on ``bulk_port``) seen through a
    link of ``rtt_ms`` round trip; the address to connect to is what ``with`` gives."""

    def __init__(self, address: str, bulk_port: int, rtt_ms: float):
        host, port = address.rsplit(":", 1)
        delay = rtt_ms / 2000.0
        self.forwards = [_Forward(0, (host, int(port)), delay), _Forward(bulk_port, (host, bulk_port), delay)]
        self.address = f"{PROXY_HOST}:{self.forwards[0].port}"

    def __enter__(self) -> str:
        return self.address

    def __exit__(self, *exc: Any) -> None:
        for f in self.forwards:
            f.close()


__all__ = ["DelayedServer", "PROXY_HOST"]
