"""What every connection of one server shares: the engine, who may connect, the limits, and
how busy the server is.

Apart from ``service.py`` (one instance per connection, the ``exposed_`` calls) because it is
the server's state, not a call: the listener, the reaper and each connection's service hold
the one ``ServerState``, and the byte count every quota reads (``held_bytes``) lives here.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable

from ..core.engine import Engine
from ..core.runs import Run
from .. import wire
from ..wire import sidechannel
from .limits import kv_bytes_per_position
from .users import Authenticator

__all__ = ["CallActivity", "ServerState"]


class CallActivity:
    """How many exposed calls are running and when the last one ended: the reaper hands freed
    memory back to the OS (``malloc_trim``, which holds the heap's locks for milliseconds) only
    once the server has been quiet a while, never under a call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._last = time.monotonic()

    def __enter__(self) -> None:
        with self._lock:
            self._running += 1

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._running -= 1
            self._last = time.monotonic()

    def quiet_for(self, seconds: float) -> bool:
        """No call running, and none ended in the last ``seconds``."""
        with self._lock:
            return self._running == 0 and time.monotonic() - self._last >= seconds


class ServerState:
    """What all connections share: the engine, who may connect, and the limits."""

    def __init__(
        self,
        engine: Engine,
        auth: Authenticator | None = None,
        max_payload: int = wire.DEFAULT_MAX_PAYLOAD,
        max_paused_bytes: int | None = None,
        bulk: sidechannel.BulkServer | None = None,
        limits: Any = None,
    ):
        self.engine = engine
        self.auth = auth or Authenticator({})
        self.max_payload = max_payload
        self.max_paused_bytes = max_paused_bytes
        self.bulk = bulk
        self.limits = limits
        self.inflight: Any = None
        self.freed = threading.Event()  # set when runs were closed: the reaper trims the heap
        self.activity = CallActivity()
        self.on_hello: Callable[[Any], None] = lambda conn: None
        self.connections: collections.Counter[str] = collections.Counter()  # per owner, past hello
        self.connections_lock = threading.Lock()
        model = getattr(engine, "model", None)
        self.kv_per_position = kv_bytes_per_position(model.config, engine.dtype) if model is not None else 0
        self.max_positions: int | None = getattr(engine, "max_positions", None)

    def kv_bytes(self, positions: int) -> int:
        """What a KV cache of ``positions`` positions holds (at most the model's positions): the
        estimate a call is admitted on before it allocates; the count after it still decides."""
        if type(positions) is not int or positions <= 0:
            return 0
        return self.kv_per_position * min(positions, self.max_positions or positions)

    def after_change(self, run: Run) -> None:
        """Apply the residency budget once a call has left ``run`` paused or done."""
        if self.max_paused_bytes is not None:
            self.engine.enforce_budget(self.max_paused_bytes, keep=run.id)

    def held_bytes(self, owner: str | None = None) -> int:
        """Bytes ``owner``'s runs (all runs when None) keep alive, device and host alike: every
        storage they reference, whole, once (``Run.storages``), their pending side-channel
        transfers (a reserved upload, an unfetched download), and the SAEs they loaded."""
        runs = self.engine.all_runs() if owner is None else self.engine.runs(owner)
        kept: dict[int, int] = {}
        for run in runs:
            kept.update(run.storages())
        pending = self.bulk.reserved_bytes(owner) if self.bulk is not None else 0  # side-channel transfers
        saes = getattr(getattr(self.engine, "stepper", None), "saes", None)  # None: a stand-in engine
        return sum(kept.values()) + pending + (saes.held_bytes(owner) if saes is not None else 0)
