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
with :func:`djinn_nb.serving.wire.check_header` and its cap exactly as inline payloads.
No pickle, no code: only raw bytes whose length the header fixes.
"""
from __future__ import annotations

import hmac
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import BadRequestError, DjinnError
from . import wire
from .transport import tune_socket

TICKET_BYTES = 32
#: Tensors of at least this many bytes go through the side channel (below it, inline rpyc is cheaper).
BULK_THRESHOLD = 1 << 20
_ACK = b"\x01"


def tensor_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's own memory (no copy)."""
    if t.numel() == 0:
        return memoryview(bytearray())
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


@dataclass
class _Slot:
    tensor: torch.Tensor
    upload: bool
    expires: float
    owner: str = ""
    claimed: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class BulkServer:
    """A listening socket that serves offered tensors and receives expected ones, by ticket."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        ttl: float = 60.0,
        max_slots: int = 64,
        per_owner: int = 16,
        max_reserved_bytes: int = 4 << 30,
    ):
        self.ttl = ttl
        self.max_slots = max_slots
        self.per_owner = per_owner
        self.max_reserved_bytes = max_reserved_bytes
        self._slots: dict[bytes, _Slot] = {}
        self._lock = threading.Lock()
        self._conns = threading.BoundedSemaphore(32)
        self._sock = socket.create_server((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="djinn-bulk", daemon=True)
        self._thread.start()

    # ----- the server's side of the rpyc call ---------------------------------------
    def offer(self, tensor: torch.Tensor, owner: str = "") -> dict[str, Any]:
        """Hold ``tensor`` for one download; returns ``{dtype, shape, port, ticket}`` for the reply.

        The slot keeps a reference, not a copy: do not change the tensor in place before it is fetched.
        """
        name = wire.dtype_name(tensor.dtype)
        if name not in wire.WIRE_DTYPES:
            raise BadRequestError(f"dtype {name} cannot cross the wire; use one of {sorted(wire.WIRE_DTYPES)}")
        t = tensor.detach().to("cpu").contiguous()
        slot = _Slot(t, upload=False, expires=time.monotonic() + self.ttl, owner=owner)
        return {"dtype": name, "shape": list(t.shape), **self._add(slot)}

    def expect(self, meta: Any, max_bytes: int = wire.DEFAULT_MAX_PAYLOAD, owner: str = "") -> dict[str, Any]:
        """Reserve one upload of a tensor with header ``meta`` (validated) for ``owner``; returns ``{port, ticket}``."""
        dtype, shape, _ = wire.check_header(meta, max_bytes)
        slot = _Slot(torch.empty(shape, dtype=dtype), upload=True, expires=time.monotonic() + self.ttl, owner=owner)
        return self._add(slot)

    def take(self, ticket: Any, owner: str = "", timeout: float = 30.0) -> torch.Tensor:
        """The tensor ``owner`` uploaded under ``ticket`` (waits up to ``timeout`` for it to arrive)."""
        key = _ticket_bytes(ticket)
        with self._lock:
            slot = self._slots.get(key)
        if slot is None or not slot.upload or not hmac.compare_digest(slot.owner, owner):
            raise BadRequestError("unknown or expired upload ticket")
        if not slot.done.wait(timeout):
            raise BadRequestError("the upload did not arrive in time")
        with self._lock:
            self._slots.pop(key, None)
        return slot.tensor

    def pending(self) -> int:
        """How many tickets are outstanding (offered, or expected and not yet taken)."""
        with self._lock:
            self._expire()
            return len(self._slots)

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        finally:
            with self._lock:
                self._slots.clear()

    # ----- internals ----------------------------------------------------------------
    def _add(self, slot: _Slot) -> dict[str, Any]:
        """File a slot. Memory stays bounded without one owner cancelling another's transfers:
        an owner over its share loses its own oldest unclaimed slot; a full table refuses."""
        key = secrets.token_bytes(TICKET_BYTES)
        nbytes = slot.tensor.numel() * slot.tensor.element_size()
        with self._lock:
            self._expire()
            mine = [k for k, s in self._slots.items() if s.owner == slot.owner and not s.claimed]
            while mine and len(mine) >= self.per_owner:
                del self._slots[mine.pop(0)]
            reserved = sum(s.tensor.numel() * s.tensor.element_size() for s in self._slots.values() if s.upload)
            if len(self._slots) >= self.max_slots or (slot.upload and reserved + nbytes > self.max_reserved_bytes):
                raise BadRequestError("the side channel is busy (too many transfers pending); try again shortly")
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
            except OSError:
                return
            if not self._conns.acquire(blocking=False):
                conn.close()  # too many at once: the client sees EOF and reports it
                continue
            threading.Thread(target=self._serve, args=(conn,), name="djinn-bulk-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        mine: _Slot | None = None  # the slot this connection claimed
        try:
            tune_socket(conn)
            conn.settimeout(10.0)
            key = _recv_exact(conn, TICKET_BYTES)
            with self._lock:
                self._expire()
                slot = self._slots.get(key)
                if slot is None or slot.claimed:
                    return
                slot.claimed = True  # single use: a second connection with this ticket gets nothing
                mine = slot
                if not slot.upload:
                    del self._slots[key]
            conn.settimeout(60.0)  # per recv/send: a stalled peer frees its thread within a minute
            if slot.upload:
                _recv_into(conn, tensor_view(slot.tensor))
                slot.done.set()
                conn.sendall(_ACK)
            else:
                conn.sendall(tensor_view(slot.tensor))
        except (OSError, EOFError):
            pass
        finally:
            if mine is not None and mine.upload and not mine.done.is_set():
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


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got, count = 0, len(view)
    while got < count:
        n = sock.recv_into(view[got:], count - got)
        if not n:
            raise EOFError(f"side channel closed after {got} of {count} bytes")
        got += n


def _connect(host: str, port: Any, ticket: Any, timeout: float) -> socket.socket:
    if type(port) is not int or not 0 < port < 65536:
        raise BadRequestError(f"bad side-channel port {port!r}")
    key = _ticket_bytes(ticket)
    sock = socket.create_connection((host, port), timeout=timeout)
    tune_socket(sock)
    sock.sendall(key)
    return sock


# ----- the client's side ------------------------------------------------------------
def fetch(host: str, reply: Any, max_bytes: int = 1 << 40, timeout: float = 60.0) -> torch.Tensor:
    """Download the tensor a server ``offer``ed: ``reply`` is ``{dtype, shape, port, ticket}``."""
    if not isinstance(reply, dict) or set(reply) != {"dtype", "shape", "port", "ticket"}:
        raise BadRequestError("a side-channel reply is {dtype, shape, port, ticket}")
    dtype, shape, _ = wire.check_header({"dtype": reply["dtype"], "shape": reply["shape"]}, max_bytes)
    out = torch.empty(shape, dtype=dtype)
    sock = _connect(host, reply["port"], reply["ticket"], timeout)
    try:
        _recv_into(sock, tensor_view(out))
    except (OSError, EOFError) as e:
        raise DjinnError(f"side-channel download failed (ticket unknown, expired or used?): {e}") from None
    finally:
        sock.close()
    return out


def push(host: str, slot: Any, tensor: torch.Tensor, timeout: float = 60.0) -> None:
    """Upload ``tensor`` to a slot the server ``expect``ed: ``slot`` is ``{port, ticket}``."""
    if not isinstance(slot, dict) or set(slot) != {"port", "ticket"}:
        raise BadRequestError("a side-channel slot is {port, ticket}")
    t = tensor.detach().to("cpu").contiguous()
    sock = _connect(host, slot["port"], slot["ticket"], timeout)
    try:
        sock.sendall(tensor_view(t))
        sock.shutdown(socket.SHUT_WR)  # a short upload then ends at the server at once, not at a timeout
        if _recv_exact(sock, 1) != _ACK:
            raise EOFError("no acknowledgement")
    except (OSError, EOFError) as e:
        raise DjinnError(f"side-channel upload failed (ticket unknown, expired or used, or wrong size?): {e}") from None
    finally:
        sock.close()
