"""The server's lifecycle: the listener, the side channel and the lease reaper.

:class:`DjinnServer` serves an engine over rpyc (``service.DjinnService`` per
connection). It binds 127.0.0.1 unless told otherwise, and refuses any other
address without a token.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
import time

import rpyc
from rpyc.utils.server import ThreadedServer

from ..core.engine import Engine
from ..errors import AuthenticationError, BadRequestError
from . import sidechannel, wire
from .protocol import DEFAULT_PORT
from .service import DjinnService, ServerState
from .transport import RPYC_CONFIG, FastChannel, FastSocketStream, tune_socket

DEFAULT_LEASE_SECONDS = 600.0
#: Largest frame a connection may send before ``hello`` succeeds.
UNAUTHENTICATED_FRAME = 64 << 10
log = logging.getLogger("djinn_nb.serving.server")

def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

class _FastThreadedServer(ThreadedServer):
    """rpyc's threaded server, over the fast uncompressed channel."""

    def _serve_client(self, sock, credentials):  # noqa: ANN001 - rpyc's signature
        tune_socket(sock)
        config = dict(self.protocol_config, credentials=credentials, endpoints=(sock.getsockname(), sock.getpeername()), logger=self.logger)
        conn = self.service._connect(FastChannel(FastSocketStream(sock), max_frame=UNAUTHENTICATED_FRAME), config)
        self._handle_connection(conn)

    def _handle_connection(self, conn) -> None:  # noqa: ANN001
        try:
            conn.serve_all()
        except OSError:  # the server closed this client's socket while it was being polled
            conn.close()


class DjinnServer:
    """Serve an engine over rpyc; ``start()`` runs it in a background thread.

    Runs untouched for ``lease_seconds`` are closed by a reaper thread (their device
    memory is freed), so a notebook that dies leaks nothing for long, while one
    that restarts within the lease can ``attach`` to its paused runs again.
    """

    def __init__(
        self,
        engine: Engine,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        token: str | None = None,
        max_payload: int = wire.DEFAULT_MAX_PAYLOAD,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_paused_bytes: int | None = None,
    ):
        if not is_loopback(host) and not token:
            raise AuthenticationError(
                f"refusing to bind {host} without a token: pass --token or set DJINN_TOKEN "
                "(clients then connect with token=...)"
            )
        if not lease_seconds > 0:
            raise BadRequestError(f"lease_seconds must be positive, got {lease_seconds!r}")
        self.state = ServerState(engine, token, max_payload, max_paused_bytes)
        self.lease_seconds = float(lease_seconds)
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="djinn-lease-reaper", daemon=True)
        self._server = _FastThreadedServer(
            rpyc.utils.helpers.classpartial(DjinnService, self.state),
            hostname=host,
            port=port,
            protocol_config=dict(RPYC_CONFIG),
            logger=log,
        )
        self._server._listen()  # listen now, so the address is connectable once we return
        self.host, self.port = self._server.host, self._server.port
        self.state.bulk = sidechannel.BulkServer(host)  # after the rpyc port bound: nothing leaks if it fails
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _reap(self) -> None:
        interval = min(5.0, max(0.05, self.lease_seconds / 4))
        while not self._stop.wait(interval):
            for run_id in self.state.engine.expire(self.lease_seconds):
                log.info("lease expired: closed run %s", run_id)

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

    loaded = load_model(model, device=device, dtype=dtype, device_map=device_map, seed=seed)
    return Engine(loaded.model, loaded.tokenizer, loaded.name, cuda_graphs=cuda_graphs)
