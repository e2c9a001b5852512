"""rpyc streams that move bulk bytes at close to socket speed.

rpyc's defaults cost three things on tensors (measured in
``shared/notes/measurements.md``): zlib on every frame over 3 KB, Nagle's
delayed ACK on the frame's trailing write, and ``data = data[count:]`` slicing
that makes one large write quadratic. Here compression is off, TCP_NODELAY is
set, writes go through ``sendall`` on a memoryview and a frame is read with
``recv_into`` into one buffer that the protocol then slices without copying.
Each stream counts the bytes it moved (``bytes_in``/``bytes_out``) so that
benchmarks can report what really crossed the socket.

This path still copies a payload several times inside rpyc's brine and
protocol (about four copies each way); tensors of megabytes and up move at
link speed through :mod:`djinn_nb.wire.sidechannel` instead.
"""
from __future__ import annotations

import os
import select
import socket
import threading
import time
from typing import Any

import rpyc
from rpyc.core.channel import Channel
from rpyc.core.stream import SocketStream
from rpyc.lib import Timeout
from rpyc.utils.factory import connect_channel

#: The attribute rules for both ends: nothing but ``exposed_`` names, no pickle.
RPYC_CONFIG: dict[str, Any] = {
    "allow_public_attrs": False,
    "allow_all_attrs": False,
    "allow_setattr": False,
    "allow_delattr": False,
    "allow_pickle": False,
    "import_custom_exceptions": False,
    "instantiate_custom_exceptions": False,
    "instantiate_oldstyle_exceptions": False,
    "include_local_traceback": False,
    "include_local_version": False,
    "propagate_SystemExit_locally": True,
    "log_exceptions": False,
    "sync_request_timeout": 3600,
}


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY (both ends need it, or a frame's tail waits on delayed ACK) and 4 MiB buffers."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass


class SpareDescriptor:
    """One descriptor held in reserve, so that a listener out of descriptors refuses newcomers
    (frees the spare, accepts and closes one, takes the spare back) instead of spinning or exiting."""

    def __init__(self) -> None:
        self._fd: int | None = os.open(os.devnull, os.O_RDONLY)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def refuse_one(self, accept: Any) -> None:
        """Out of descriptors: ``accept()`` one waiting peer and close it at once."""
        self.release()
        try:
            accept()[0].close()
        except OSError:
            time.sleep(0.05)
        try:
            self._fd = os.open(os.devnull, os.O_RDONLY)
        except OSError:
            time.sleep(0.05)


class FastSocketStream(SocketStream):
    """A SocketStream without the quadratic write, with buffer-filling reads and byte counters.

    ``spin_s`` > 0 makes :meth:`poll` look for data without sleeping for that long before it
    blocks: a thread woken from a blocking wait on a socket took 0.2-0.5 ms to run again on
    the machines measured (an echo whose server works 5 ms costs that much more than an
    immediate one), a whole pause's budget. Clients of a server in another process spin; an
    embedded server's client never does (it would take the GIL from the server it waits on).
    """

    __slots__ = ("bytes_in", "bytes_out", "spin_s", "_poller")

    def __init__(self, sock: socket.socket):
        super().__init__(sock)
        self.bytes_in = 0
        self.bytes_out = 0
        self.spin_s = 0.0
        self._poller: Any = None

    def write(self, data: bytes) -> None:
        try:
            self.sock.sendall(memoryview(data))
        except OSError as ex:
            self.close()
            raise EOFError(ex) from None
        self.bytes_out += len(data)

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` from the socket; ``EOFError`` if the peer goes away first."""
        count, got = len(view), 0
        while got < count:
            try:
                n = self.sock.recv_into(view[got:], count - got)
            except socket.timeout:
                continue
            except OSError as ex:
                self.close()
                raise EOFError(ex) from None
            if not n:
                self.close()
                raise EOFError("connection closed by peer")
            got += n
        self.bytes_in += count

    def poll(self, timeout: Any) -> bool:
        """Also true when TLS has already decrypted bytes that ``select`` cannot see."""
        pending = getattr(self.sock, "pending", None)
        if pending is not None and pending():
            return True
        if self.spin_s > 0:
            left = Timeout(timeout).timeleft()
            end = time.perf_counter() + (self.spin_s if left is None else min(self.spin_s, left))
            if self._poller is None:
                self._poller = select.poll()
                self._poller.register(self.sock.fileno(), select.POLLIN | select.POLLPRI)
            while True:
                if self._poller.poll(0):  # the syscall lets other threads of this process run
                    return True
                if time.perf_counter() >= end:
                    break
        return super().poll(timeout)

    def read(self, count: int) -> bytes:
        buf = bytearray(count)
        self.read_into(memoryview(buf))
        return bytes(buf)


class InflightBudget:
    """Bytes of large request frames all connections may hold at once (the server's host memory)."""

    def __init__(self, total: int, wait_s: float = 30.0):
        self.total, self.wait_s, self.used = total, wait_s, 0
        self._cv = threading.Condition()

    def acquire(self, n: int) -> bool:
        with self._cv:
            if n > self.total:
                return False
            if not self._cv.wait_for(lambda: self.used + n <= self.total, self.wait_s):
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


#: Frames up to this size are not counted against an ``InflightBudget``.
SMALL_FRAME = 64 << 10


class FastChannel(Channel):
    """An uncompressed rpyc channel that writes and reads each frame with as few copies as it can."""

    __slots__ = ("max_frame", "budget", "_held")

    def __init__(self, stream: FastSocketStream, max_frame: int | None = None, budget: InflightBudget | None = None):
        super().__init__(stream, compress=False)
        #: Frames longer than this end the connection before any buffer is allocated (the
        #: length comes from the peer); the server keeps it small until ``hello`` succeeds.
        self.max_frame = max_frame
        #: On the server, large frames reserve their bytes here until the next frame is read
        #: (rpyc handles a request before reading the next one on the same connection).
        self.budget = budget
        self._held = 0

    def _give_back(self) -> None:
        if self._held and self.budget is not None:  # bytes are held only against a budget
            self.budget.release(self._held)
            self._held = 0

    def close(self) -> None:
        if self.budget is not None:
            self._give_back()
        super().close()

    def send(self, data: bytes) -> None:
        header = self.FRAME_HEADER.pack(len(data), 0)
        if len(data) < 1 << 16:
            self.stream.write(header + data + self.FLUSHER)
        else:  # one copy less than joining: three writes on a NODELAY socket
            self.stream.write(header)
            self.stream.write(data)
            self.stream.write(self.FLUSHER)

    def _hang_up(self, why: str) -> None:
        """Close the socket first: rpyc's close() then cannot wait on a reply from this peer."""
        self.stream.close()
        raise EOFError(why)

    def recv(self) -> memoryview:
        """The next frame as a read-only view of one buffer filled by ``recv_into``.

        rpyc only slices the frame and hands it to ``BytesIO``, both of which take
        a memoryview; returning one saves the two whole-frame copies that
        ``bytes(buf)`` and ``[:-1]`` would make.
        """
        length, compressed = self.FRAME_HEADER.unpack(self.stream.read(self.FRAME_HEADER.size))
        if compressed:
            self._hang_up("peer sent a compressed frame; djinn_nb never compresses")
        if self.max_frame is not None and length > self.max_frame:
            self._hang_up(f"peer sent a {length}-byte frame, over this connection's cap of {self.max_frame}")
        if self.budget is not None:
            self._give_back()
            if length > SMALL_FRAME:
                if not self.budget.acquire(length):
                    self._hang_up(f"no memory for a {length}-byte request: the server's in-flight budget is spent")
                self._held = length
        buf = bytearray(length + len(self.FLUSHER))
        self.stream.read_into(memoryview(buf))
        if buf[length:] != self.FLUSHER:
            self._hang_up("frame does not end with the flusher byte: the stream is out of sync")
        return memoryview(buf)[:length].toreadonly()


def default_spin_s() -> float:
    """How long a client to a server in another process waits on a reply without sleeping:
    1 ms (at most that much CPU per call) where the machine has 4 cores or more, none on smaller
    ones (the spin would take a core from a server on the same machine). Measured on an H100
    host: an immediate reply 17 % sooner; a 7 ms resume no sooner, spinning 10 ms or not."""
    return 0.001 if (os.cpu_count() or 1) >= 4 else 0.0


def open_connection(host: str, port: int, timeout: float = 10.0, ssl_context: Any = None,
                    max_frame: int | None = None, spin_s: float = 0.0) -> rpyc.Connection:
    """A client rpyc connection over the fast stream, with the locked-down config; TLS with
    ``ssl_context`` (verified, hostname included); frames over ``max_frame`` from the server end it;
    replies awaited ``spin_s`` seconds without sleeping (see :class:`FastSocketStream`)."""
    from . import tls

    sock = socket.create_connection((host, port), timeout=timeout)
    tune_socket(sock)
    sock = tls.connect(ssl_context, sock, host, f"djinn server {host}:{port}", timeout)
    sock.settimeout(None)
    stream = FastSocketStream(sock)
    stream.spin_s = spin_s
    return connect_channel(FastChannel(stream, max_frame=max_frame), service=rpyc.VoidService,
                           config=dict(RPYC_CONFIG))
