"""How long a shared server keeps a run nobody touches, and what a lease may be.

Light on purpose (no torch, no rpyc): ``connect()`` checks a lease before it starts
the embedded server, whose heavy imports run with the garbage collector paused.
"""
from __future__ import annotations

import math

from ..errors import BadRequestError

#: ``djinn-server``'s default; an embedded server's is ``None`` (its runs are its kernel's).
DEFAULT_LEASE_SECONDS = 600.0


def check_lease(lease_seconds: float | None) -> None:
    """``None`` (never expire) or a positive, finite number of seconds."""
    if lease_seconds is None:
        return
    if isinstance(lease_seconds, bool) or not isinstance(lease_seconds, (int, float)) \
            or not 0 < lease_seconds or not math.isfinite(lease_seconds):
        raise BadRequestError(f"lease_seconds must be None (never expire) or a positive number, got {lease_seconds!r}"[:200])
