"""The server's lifecycle: the listener, the doorman, the side channel and the reaper.

:class:`DjinnServer` serves an engine over rpyc (``service.DjinnService`` per
connection). It binds 127.0.0.1 unless told otherwise, and refuses any other
address without authentication (``--token`` or ``--users``). Before a peer has
authenticated it is bounded in everything it can cost: a connection slot (of
``max_unauthenticated``), a small frame cap, and ``hello_seconds`` to say hello,
after which the doorman hangs up. Running out of file descriptors refuses the
newcomer (a spare descriptor is kept to accept and close it) instead of ending
the accept loop; memory freed by closed runs is handed back to the OS
(``malloc_trim`` on glibc) by the reaper.
"""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import socket
import threading
import time
from typing import Any

import rpyc
import torch
from rpyc.utils.server import ThreadedServer

from ..core.engine import Engine
from ..errors import AuthenticationError, BadRequestError
from .. import wire
from ..wire import sidechannel, tls
from .lease import DEFAULT_LEASE_SECONDS, check_lease
from .limits import Limits, derive_limits
from ..wire.protocol import DEFAULT_PORT
from .service import DjinnService
from .state import ServerState
from ..wire.transport import RPYC_CONFIG, FastChannel, FastSocketStream, InflightBudget, SpareDescriptor, tune_socket
from .users import Authenticator, User, single_user

#: Largest frame a connection may send before ``hello`` succeeds.
UNAUTHENTICATED_FRAME = 64 << 10
log = logging.getLogger("djinn_nb.serving.server")
_quiet = logging.getLogger("djinn_nb.serving.rpyc")  # rpyc logs every accept: not for peers to flood
_quiet.setLevel(logging.WARNING)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: Seconds without a call before freed heap memory is handed back: a trim running beside a call
#: holds the heap's locks that the call's allocations need.
TRIM_QUIET_S = 0.5
#: After a trim, trim again (once a second, while quiet) for this long: memory a close frees
#: late (another thread's last reference, a connection's buffers) would otherwise stay until the
#: next close, which on a busy machine left tens of MB behind.
TRIM_AGAIN_S = 3.0


def malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Door:
    """One accepted socket, from ``accept`` on: when it must have said hello by (None once it has)."""

    __slots__ = ("sock", "deadline", "peer")

    def __init__(self, sock: socket.socket, deadline: float, peer: str):
        self.sock = sock
        self.deadline: float | None = deadline  # 0.0: hung up on to make room
        self.peer = peer

    def rewrap(self, tls_sock: socket.socket) -> None:
        """TLS took the descriptor over: hang up on that from now (at once, if already told to)."""
        self.sock = tls_sock
        if self.deadline is not None and self.deadline <= 0.0:
            self.hang_up()

    def hang_up(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # also ends a TLS handshake stalled in a read
        except OSError:
            pass


#: Seconds between two log lines about one address's unreadable frames.
NOISE_LOG_SECONDS = 60.0


class _Listener(ThreadedServer):
    """rpyc's threaded server over the fast channel, with connection caps, TLS and a doorman.

    A socket counts against the caps from ``accept`` (a TLS handshake included). When the
    not-yet-authenticated slots are full, the *oldest* such socket is hung up on to make room:
    a client with a token says hello within milliseconds of connecting, so a peer holding idle
    sockets (or reconnecting in a loop) cannot lock it out, as refusing the newcomer did.
    """

    def __init__(self, djinn: "DjinnServer", *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.djinn = djinn
        self._spare = SpareDescriptor()
        self._doors: dict[socket.socket, _Door] = {}  # accepted socket -> its door (insertion: oldest first)
        self._by_conn: dict[Any, _Door] = {}
        self._conns_lock = threading.Lock()
        self._noise_logged: dict[str, float] = {}

    def accept(self) -> None:
        try:
            sock, addr = self.listener.accept()
        except socket.timeout:
            return
        except OSError as e:
            if not self.active:
                raise EOFError() from None
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._refuse_one()
            elif e.errno not in (errno.EINTR, errno.EAGAIN, errno.ECONNABORTED):
                raise EOFError() from None
            return
        sock.setblocking(True)
        limits = self.djinn.limits
        evict = None
        with self._conns_lock:
            pending = [d for d in self._doors.values() if d.deadline]  # not authenticated, nor hung up on
            if len(pending) >= limits.max_unauthenticated:
                evict = pending[0]  # the oldest that has not said hello
            elif len(self._doors) >= limits.max_connections:
                _close(sock)
                return
            self._doors[sock] = _Door(sock, time.monotonic() + limits.hello_seconds, str(addr[0]) if addr else "?")
            if evict is not None:
                evict.deadline = 0.0
        if evict is not None:
            evict.hang_up()
        self.clients.add(sock)
        try:
            threading.Thread(target=self._authenticate_and_serve_client, args=(sock,), daemon=True).start()
        except RuntimeError:  # no thread to be had: refuse this one, keep serving
            self.clients.discard(sock)
            with self._conns_lock:
                self._doors.pop(sock, None)
            _close(sock)

    def _refuse_one(self) -> None:
        """Out of descriptors: refuse the newcomer with the spare descriptor, keep serving."""
        self._spare.refuse_one(self.listener.accept)

    def _serve_client(self, sock: socket.socket, credentials: Any) -> None:
        with self._conns_lock:
            door = self._doors.get(sock)
        try:
            if door is not None:
                self._serve_door(sock, door)
        finally:
            with self._conns_lock:
                self._doors.pop(sock, None)

    def _serve_door(self, sock: socket.socket, door: _Door) -> None:
        tune_socket(sock)
        state = self.djinn.state
        if self.djinn.tls_context is not None:
            try:
                sock = tls.accept(self.djinn.tls_context, sock, min(tls.HANDSHAKE_SECONDS, self.djinn.limits.hello_seconds),
                                  on_wrap=door.rewrap)
            except (OSError, ValueError):
                return  # a plain client, a bad certificate or a stalled handshake: nothing was served
        try:
            endpoints = (sock.getsockname(), sock.getpeername())
        except OSError:
            return
        config = dict(self.protocol_config, credentials=None, endpoints=endpoints, logger=self.logger)
        channel = FastChannel(FastSocketStream(sock), max_frame=UNAUTHENTICATED_FRAME, budget=state.inflight)
        conn = self.service._connect(channel, config)
        with self._conns_lock:
            self._by_conn[conn] = door
        try:
            conn.serve_all()
        except OSError:
            conn.close()
        except Exception as e:  # noqa: BLE001 - a peer's unreadable frames: one short line per address a minute
            conn.close()
            self._note_noise(door.peer, e)
        finally:
            with self._conns_lock:
                self._by_conn.pop(conn, None)

    def _note_noise(self, peer: str, error: Exception) -> None:
        now = time.monotonic()
        with self._conns_lock:
            last = self._noise_logged.get(peer)
            if last is not None and now - last < NOISE_LOG_SECONDS:
                return
            if len(self._noise_logged) > 4096:
                self._noise_logged.clear()
            self._noise_logged[peer] = now
        log.warning("dropped a connection from %s: %s (further ones from there not logged for %.0f s)",
                    peer[:64], f"{type(error).__name__}: {error}"[:120], NOISE_LOG_SECONDS)

    def authenticated(self, conn: Any) -> None:
        with self._conns_lock:
            door = self._by_conn.get(conn)
            if door is not None:
                door.deadline = None

    def sweep(self) -> None:
        """Hang up on sockets that did not say hello in time (a TLS handshake included)."""
        now = time.monotonic()
        with self._conns_lock:
            late = [d for d in self._doors.values() if d.deadline is not None and d.deadline < now]
        for door in late:
            door.hang_up()

    def close(self) -> None:
        super().close()
        self._spare.release()


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


class DjinnServer:
    """Serve an engine over rpyc; ``start()`` runs it in a background thread.

    Runs untouched for ``lease_seconds`` are closed by a reaper thread (their device
    memory is freed), so a notebook that dies leaks nothing for long, while one
    that restarts within the lease can ``attach`` to its paused runs again.
    ``lease_seconds=None``: runs are never expired (an embedded server's default: its
    runs are its own kernel's). An expired run's owner is told so, with ``lease_hint``
    (what sets the lease where this server was started).
    ``users`` (see users.py) or ``token`` authenticate; ``tls_cert``/``tls_key`` put
    both channels under TLS. ``limits=None`` derives every byte, run and step cap from the
    model and the machine (``embedded``: a notebook's own server, more generous), see limits.py.
    """

    def __init__(
        self,
        engine: Engine,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        token: str | None = None,
        max_payload: int = wire.DEFAULT_MAX_PAYLOAD,
        lease_seconds: float | None = DEFAULT_LEASE_SECONDS,
        max_paused_bytes: int | None = None,
        users: dict[str, User] | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        limits: Limits | None = None,
        lease_hint: str = "--lease-seconds sets this",
        embedded: bool = False,
    ):
        if users and token:
            raise BadRequestError("pass either a token or a users file, not both")
        users = users or single_user(token)
        if not is_loopback(host) and not users:
            raise AuthenticationError(
                f"refusing to bind {host} without a token: pass --token or set DJINN_TOKEN, or --users FILE "
                "(clients then connect with token=...)"
            )
        check_lease(lease_seconds)
        if (tls_cert is None) != (tls_key is None):
            raise BadRequestError("TLS needs both --tls-cert and --tls-key")
        if limits is None:  # every cap derived from the model and the machine (limits.py)
            limits = derive_limits({}, device=getattr(engine, "device", torch.device("cpu")),
                                   max_positions=getattr(engine, "max_positions", None), users=len(users),
                                   embedded=embedded)
        self.limits = limits
        log.info("%s", limits.describe())
        self.tls_context = None
        if tls_cert:
            assert tls_key is not None  # checked above: both or neither
            self.tls_context = tls.server_context(tls_cert, tls_key)
        self.state = ServerState(engine, Authenticator(users, self.limits.auth_failures), max_payload,
                                 max_paused_bytes, limits=self.limits)
        self.state.inflight = InflightBudget(self.limits.inflight_bytes, self.limits.inflight_wait_s)
        self.lease_seconds = None if lease_seconds is None else float(lease_seconds)
        self.lease_hint = lease_hint
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="djinn-lease-reaper", daemon=True)
        self._server = _Listener(
            self,
            rpyc.utils.helpers.classpartial(DjinnService, self.state),
            hostname=host,
            port=port,
            protocol_config=dict(RPYC_CONFIG),
            logger=_quiet,
        )
        self.state.on_hello = self._server.authenticated
        self._server._listen()  # listen now, so the address is connectable once we return
        self.host, self.port = self._server.host, self._server.port
        # after the rpyc port bound: nothing leaks if it fails
        self.state.bulk = sidechannel.BulkServer(host, tls_context=self.tls_context)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _reap(self) -> None:
        last_expiry = time.monotonic()
        trim_until = last_trim = 0.0
        while not self._stop.wait(min(0.25, (self.lease_seconds or 1.0) / 4)):
            self._server.sweep()
            if self.state.bulk is not None:
                self.state.bulk.sweep()
            lease = self.lease_seconds  # may be changed while serving (connect(lease_seconds=...))
            if lease is not None and time.monotonic() - last_expiry >= min(5.0, lease / 4):
                last_expiry = time.monotonic()
                for run_id in self.state.engine.expire(lease, self.lease_hint):
                    log.info("lease expired: closed run %s", run_id)
                    self.state.freed.set()
            now = time.monotonic()
            if self.state.freed.is_set() and self.state.activity.quiet_for(TRIM_QUIET_S):
                self.state.freed.clear()
                malloc_trim()
                trim_until, last_trim = now + TRIM_AGAIN_S, now
            elif now < trim_until and now - last_trim >= 1.0 and self.state.activity.quiet_for(TRIM_QUIET_S):
                malloc_trim()
                last_trim = now

    def open_connections(self) -> int:
        """Connections past hello and not closed yet (the local server's idle clock: a socket that
        never says hello, another local user's say, must not keep the server up forever)."""
        return sum(1 for d in list(self._server._doors.values()) if d.deadline is None)

    def start(self) -> "DjinnServer":
        self._reaper.start()
        self._thread = threading.Thread(target=self._server.start, name="djinn-server", daemon=True)
        self._thread.start()
        while not self._server.active:
            time.sleep(0.005)
        return self

    def serve_forever(self) -> None:
        self._reaper.start()
        self._server.start()

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        if self.state.bulk is not None:
            self.state.bulk.close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def build_engine(
    model: str | None,
    device: str,
    dtype: str | None = None,
    device_map: str | None = None,
    seed: int = 0,
    cuda_graphs: bool | None = None,
) -> Engine:
    """Load a model and wrap it in an engine (the exactness probe runs here)."""
    from ..core.models import load_model
    from ..core.threads import apply_thread_setting

    apply_thread_setting()
    loaded = load_model(model, device=device, dtype=dtype, device_map=device_map, seed=seed)
    return Engine(loaded.model, loaded.tokenizer, loaded.name, cuda_graphs=cuda_graphs)
