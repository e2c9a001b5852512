"""A side channel that moves tensor bytes at socket speed, authorized by the rpyc session.

Through rpyc a payload is copied about four times on each side (brine's
framing, the protocol's slicing, ``bytes`` objects); on 64 MB each copy costs
about half of what the socket itself does. Here a tensor crosses with no copy
in user space: the sender ``sendall``s the tensor's own memory and the receiver
``recv_into``s a freshly allocated tensor.

Authorization is by capability. The server ``offer``s a tensor (download) or
``expect``s one (upload) and gets a 256-bit random ticket, which it returns only
inside an authenticated rpyc reply (so only the caller who passed ``hello`` and
owns the run learns it). A peer of the bulk port sends the ticket first; an
unknown ticket gets the connection closed with nothing sent. Tickets are single
use and expire after ``ttl`` seconds; the header (dtype, shape) is validated
with :func:`djinn_nb.wire.check_header` and its cap exactly as inline payloads.
No pickle, no code: only raw bytes whose length the header fixes.
"""
from __future__ import annotations

import errno
import hmac
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import BadRequestError, DjinnError, QuotaError
from . import codec as wire
from . import tls
from .transport import SpareDescriptor, tune_socket

if TYPE_CHECKING:
    import torch  # imported where a tensor is made: a client without tensors never loads torch

TICKET_BYTES = 32
#: Tensors of at least this many bytes go through the side channel (below it, inline rpyc is cheaper).
BULK_THRESHOLD = 1 << 20
_ACK = b"\x01"
#: Seconds a peer has to present its ticket (in total, however it trickles).
TICKET_SECONDS = 5.0
#: Slowest transfer rate tolerated (bytes/s) once a ticket is presented, and the least time allowed.
MIN_RATE, MIN_TRANSFER_SECONDS = 1 << 20, 30.0


def tensor_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's own memory (no copy)."""
    if t.numel() == 0:
        return memoryview(bytearray())
    import torch

    # numpy's stubs give ndarray __buffer__ only for Python >= 3.12 (PEP 688); it has the buffer protocol on all
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


@dataclass
class _Slot:
    tensor: torch.Tensor | None  # an upload's tensor is allocated when its peer connects
    upload: bool
    expires: float
    owner: str = ""
    conn: int = 0  # the rpyc connection that reserved it: released when that connection ends
    dtype: Any = None
    shape: list[int] = field(default_factory=list)
    nbytes: int = 0
    claimed: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class BulkServer:
    """A listening socket that serves offered tensors and receives expected ones, by ticket.

    Bounded against its peers: a connection has ``TICKET_SECONDS`` in all to present a
    ticket and then a deadline set by the size (``MIN_RATE``), however it trickles; at
    most ``max_conns`` are served at once. A slot is never taken from one transfer to
    make room for another: past ``max_slots`` (or the reserved bytes) a new one is
    refused, and no owner's transfers may reserve more than half the bytes (the server also
    counts them to the owner's byte quota); every slot goes on use, expiry (``ttl``), a failed transfer or the end of
    the rpyc connection that reserved it.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        ttl: float = 60.0,
        max_slots: int = 256,
        per_owner: int = 128,
        max_reserved_bytes: int = 4 << 30,
        max_conns: int = 128,
        tls_context: Any = None,
    ):
        self.ttl = ttl
        self.max_slots = max_slots
        self.per_owner = per_owner
        self.max_reserved_bytes = max_reserved_bytes
        self.tls_context = tls_context
        self._slots: dict[bytes, _Slot] = {}
        self._waiting: dict[int, socket.socket] = {}  # connections still to present a ticket, oldest first
        self._lock = threading.Lock()
        self._conns = threading.BoundedSemaphore(max_conns)
        self._sock = socket.create_server((host, port), backlog=max_conns)
        self.host, self.port = self._sock.getsockname()[:2]
        self._closed = False
        self._spare = SpareDescriptor()
        self._thread = threading.Thread(target=self._accept_loop, name="djinn-bulk", daemon=True)
        self._thread.start()

    # ----- the server's side of the rpyc call ---------------------------------------
    def offer(self, tensor: torch.Tensor, owner: str = "", conn: int = 0) -> dict[str, Any]:
        """Hold ``tensor`` for one download; returns ``{dtype, shape, port, ticket}`` for the reply.

        The slot keeps a reference, not a copy: do not change the tensor in place before it is fetched.
        """
        name = wire.dtype_name(tensor.dtype)
        if name not in wire.WIRE_DTYPES:
            raise BadRequestError(f"dtype {name} cannot cross the wire; use one of {sorted(wire.WIRE_DTYPES)}")
        t = tensor.detach().to("cpu").contiguous()
        slot = _Slot(t, upload=False, expires=time.monotonic() + self.ttl, owner=owner, conn=conn,
                     nbytes=t.numel() * t.element_size())
        return {"dtype": name, "shape": list(t.shape), **self._add(slot)}

    def expect(self, meta: Any, max_bytes: int = wire.DEFAULT_MAX_PAYLOAD, owner: str = "",
               conn: int = 0) -> dict[str, Any]:
        """Reserve one upload of a tensor with header ``meta`` (validated) for ``owner``; returns ``{port, ticket}``."""
        dtype, shape, nbytes = wire.check_header(meta, max_bytes)
        slot = _Slot(None, upload=True, expires=time.monotonic() + self.ttl, owner=owner, conn=conn,
                     dtype=dtype, shape=shape, nbytes=nbytes)
        return self._add(slot)

    def take(self, ticket: Any, owner: str = "", timeout: float = 30.0) -> torch.Tensor:
        """The tensor ``owner`` uploaded under ``ticket`` (waits up to ``timeout`` for it to arrive)."""
        key = _ticket_bytes(ticket)
        with self._lock:
            slot = self._slots.get(key)
        if slot is None or not slot.upload or not hmac.compare_digest(slot.owner.encode(), owner.encode()):
            raise BadRequestError("unknown or expired upload ticket")
        arrived = slot.done.wait(timeout)
        with self._lock:
            self._slots.pop(key, None)  # on every path: a ticket is used once
        if not arrived or slot.tensor is None:
            raise BadRequestError("the upload did not arrive in time")
        return slot.tensor

    def pending(self) -> int:
        """How many tickets are outstanding (offered, or expected and not yet taken)."""
        with self._lock:
            self._expire()
            return len(self._slots)

    def reserved_bytes(self, owner: str | None = None) -> int:
        """Bytes of the pending transfers (``owner``'s only, when given): what the server holds
        or has promised to receive for them, counted to their owner's byte quota."""
        with self._lock:
            return sum(s.nbytes for s in self._slots.values() if owner is None or s.owner == owner)

    def release(self, conn: int) -> None:
        """Drop every slot the rpyc connection ``conn`` reserved and nobody is transferring."""
        with self._lock:
            for key in [k for k, s in self._slots.items() if s.conn == conn and not s.claimed]:
                del self._slots[key]

    def sweep(self) -> None:
        """Drop expired slots (called periodically, not only when a new one is filed)."""
        with self._lock:
            self._expire()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        finally:
            with self._lock:
                self._slots.clear()
            self._spare.release()

    # ----- internals ----------------------------------------------------------------
    def _add(self, slot: _Slot) -> dict[str, Any]:
        """File a slot, or refuse it: never by cancelling another transfer."""
        key = secrets.token_bytes(TICKET_BYTES)
        with self._lock:
            self._expire()
            mine = [s for s in self._slots.values() if s.owner == slot.owner]
            reserved = sum(s.nbytes for s in self._slots.values())
            if sum(s.nbytes for s in mine) + slot.nbytes > self.max_reserved_bytes // 2:
                raise QuotaError("quota side_channel: your pending transfers would take more than half of the side "
                                 "channel's reservations; fetch or send them one after another", quota="side_channel")
            if (len(self._slots) >= self.max_slots or len(mine) >= self.per_owner
                    or reserved + slot.nbytes > self.max_reserved_bytes):
                raise QuotaError("the side channel is busy (too many transfers pending); try again shortly",
                                 quota="side_channel")
            self._slots[key] = slot
        return {"port": self.port, "ticket": key.hex()}

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self._slots.items() if s.expires < now and not s.claimed]:
            del self._slots[key]

    def _forget(self, slot: _Slot) -> None:
        with self._lock:
            for key in [k for k, s in self._slots.items() if s is slot]:
                del self._slots[key]

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError as e:
                if self._closed:
                    return
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._refuse_one()
                continue
            if not self._conns.acquire(blocking=False):
                # Full: hang up on the oldest connection still to present a ticket (a client with
                # one presents it at once), so peers reconnecting without tickets cannot hold
                # every slot; the newcomer waits a moment for that slot, else is refused.
                self._hang_up_oldest_waiting()
                if not self._conns.acquire(timeout=1.0):
                    conn.close()  # too many transfers at once: the client sees EOF and reports it
                    continue
            try:
                threading.Thread(target=self._serve, args=(conn,), name="djinn-bulk-conn", daemon=True).start()
            except RuntimeError:
                conn.close()
                self._conns.release()

    def _refuse_one(self) -> None:
        self._spare.refuse_one(self._sock.accept)

    def _hang_up_oldest_waiting(self) -> None:
        with self._lock:
            oldest = next(iter(self._waiting.values()), None)
        if oldest is not None:
            try:
                oldest.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _waiting_on(self, key: int, sock: socket.socket | None) -> None:
        """Note (or, ``None``, forget) connection ``key`` as waiting for its ticket on ``sock``."""
        with self._lock:
            if sock is None:
                self._waiting.pop(key, None)
            else:
                self._waiting[key] = sock

    def _serve(self, conn: socket.socket) -> None:
        mine: _Slot | None = None  # the slot this connection claimed
        me = id(conn)
        self._waiting_on(me, conn)
        try:
            tune_socket(conn)
            deadline = time.monotonic() + TICKET_SECONDS
            if self.tls_context is not None:
                conn = tls.accept(self.tls_context, conn, TICKET_SECONDS, on_wrap=lambda t: self._waiting_on(me, t))
            key = _recv_exact(conn, TICKET_BYTES, deadline)
            self._waiting_on(me, None)
            with self._lock:
                self._expire()
                slot = self._slots.get(key)
                if slot is None or slot.claimed or slot.done.is_set():
                    return
                slot.claimed = True  # single use: a second connection with this ticket gets nothing
                mine = slot
                if not slot.upload:
                    del self._slots[key]
            deadline = time.monotonic() + max(MIN_TRANSFER_SECONDS, slot.nbytes / MIN_RATE)
            if slot.upload:
                import torch

                slot.tensor = torch.empty(slot.shape, dtype=slot.dtype)
                _recv_into(conn, tensor_view(slot.tensor), deadline)
                slot.done.set()
                conn.sendall(_ACK)
            else:
                assert slot.tensor is not None, "a download's tensor is given when it is offered"
                conn.settimeout(max(1.0, deadline - time.monotonic()))
                conn.sendall(tensor_view(slot.tensor))
        except (OSError, EOFError, ValueError):
            pass
        finally:
            self._waiting_on(me, None)
            if mine is not None and mine.upload:
                if mine.done.is_set():
                    mine.claimed = False  # arrived: expiry or its connection's end drop it if never taken
                else:
                    mine.tensor = None
                    self._forget(mine)  # a broken upload frees its reservation at once
            conn.close()
            self._conns.release()


def _ticket_bytes(ticket: Any) -> bytes:
    if type(ticket) is not str or len(ticket) != 2 * TICKET_BYTES:
        raise BadRequestError("a ticket is a hex string of 64 characters")
    try:
        return bytes.fromhex(ticket)
    except ValueError:
        raise BadRequestError("a ticket is a hex string of 64 characters") from None


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf), deadline)
    return bytes(buf)


def _recv_into(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill ``view``; with ``deadline`` (monotonic), a peer that trickles or stalls past it is cut off."""
    got, count = 0, len(view)
    while got < count:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EOFError(f"side channel too slow: {got} of {count} bytes by the deadline")
            sock.settimeout(left)
        n = sock.recv_into(view[got:], count - got)
        if not n:
            raise EOFError(f"side channel closed after {got} of {count} bytes")
        got += n


def _connect(host: str, port: Any, ticket: Any, timeout: float, ssl_context: Any = None) -> socket.socket:
    if type(port) is not int or not 0 < port < 65536:
        raise BadRequestError(f"bad side-channel port {port!r}")
    key = _ticket_bytes(ticket)
    sock = socket.create_connection((host, port), timeout=timeout)
    tune_socket(sock)
    sock = tls.connect(ssl_context, sock, host, f"side channel {host}:{port}", timeout)
    sock.settimeout(timeout)
    sock.sendall(key)
    return sock


# ----- the client's side ------------------------------------------------------------
def fetch(host: str, reply: Any, max_bytes: int = 1 << 40, timeout: float = 60.0,
          ssl_context: Any = None) -> torch.Tensor:
    """Download the tensor a server ``offer``ed: ``reply`` is ``{dtype, shape, port, ticket}``; a header
    over ``max_bytes`` (what the caller is willing to receive) is refused before anything is allocated."""
    if not isinstance(reply, dict) or set(reply) != {"dtype", "shape", "port", "ticket"}:
        raise BadRequestError("a side-channel reply is {dtype, shape, port, ticket}")
    dtype, shape, _ = wire.check_header({"dtype": reply["dtype"], "shape": reply["shape"]}, max_bytes)
    import torch

    out = torch.empty(shape, dtype=dtype)
    sock = _connect(host, reply["port"], reply["ticket"], timeout, ssl_context)
    try:
        _recv_into(sock, tensor_view(out))
    except (OSError, EOFError) as e:
        raise DjinnError(f"side-channel download failed (ticket unknown, expired or used?): {e}") from None
    finally:
        sock.close()
    return out


def push(host: str, slot: Any, tensor: torch.Tensor, timeout: float = 60.0, ssl_context: Any = None) -> None:
    """Upload ``tensor`` to a slot the server ``expect``ed: ``slot`` is ``{port, ticket}``."""
    if not isinstance(slot, dict) or set(slot) != {"port", "ticket"}:
        raise BadRequestError("a side-channel slot is {port, ticket}")
    t = tensor.detach().to("cpu").contiguous()
    sock = _connect(host, slot["port"], slot["ticket"], timeout, ssl_context)
    try:
        sock.sendall(tensor_view(t))
        if not hasattr(sock, "unwrap"):  # TLS cannot half-close; the server knows the size anyway
            sock.shutdown(socket.SHUT_WR)  # a short upload then ends at the server at once, not at a timeout
        if _recv_exact(sock, 1) != _ACK:
            raise EOFError("no acknowledgement")
    except (OSError, EOFError) as e:
        raise DjinnError(f"side-channel upload failed (ticket unknown, expired or used, or wrong size?): {e}") from None
    finally:
        sock.close()
