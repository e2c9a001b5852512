"""Where a run is: running, paused, done, closed or failed.

Why a module of its own: the engine sets a run's state and the wire carries it, but core knows
nothing of the wire (``djinn_nb.wire``); the one word both use is shared vocabulary, like
``errors`` and ``conditions``. No torch, no rpyc: every layer may import it.
"""
from __future__ import annotations

from enum import Enum

__all__ = ["RunState"]


class RunState(str, Enum):
    """Where a run is; a ``str`` so that it crosses JSON as its value."""

    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    CLOSED = "closed"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value
