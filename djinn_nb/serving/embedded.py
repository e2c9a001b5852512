"""The embedded server: a model loaded into this process behind a loopback listener.

``connect(embedded=True)`` without an address starts one (``connect()`` reaches the local server). This module is light on purpose: it
pauses the cyclic garbage collector (:func:`~djinn_nb.core.gcpause.paused_gc`) before
the heavy imports (transformers, the engine) and the load, so those are covered too.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.gcpause import paused_gc

if TYPE_CHECKING:
    from .server import DjinnServer


LEASE_HINT = "connect(lease_seconds=...) sets this"


def start_embedded_server(model: str | None, device: str, dtype: str | None,
                          lease_seconds: float | None = None) -> "DjinnServer":
    """Load ``model`` (the exactness probe runs) and serve it on 127.0.0.1, any free port.

    Its runs are this kernel's own, so by default none ever expires: a run paused before
    lunch is there after it (``lease_seconds`` sets a lease).
    """
    with paused_gc():
        from .server import DjinnServer, build_engine

        return DjinnServer(build_engine(model, device, dtype), "127.0.0.1", 0, lease_seconds=lease_seconds,
                           lease_hint=LEASE_HINT, embedded=True).start()
