"""A bound on the objects one connection makes the server hold.

rpyc keeps every object it hands a peer by reference (the service root, each bound method a
``conn.root.generate`` lookup returns) in the connection's table until the peer sends the
matching release. An honest client releases each one as its proxy is collected and holds a
handful at any time; a hostile one can look names up in a loop and never release, growing
the server's memory without end while every call stays "legal". The server's replies are
plain values (``wire.dumps`` bytes), so nothing else ever enters that table.

:class:`BoundedObjects` replaces the table on each server connection: past
:data:`MAX_OBJECTS` distinct objects it refuses the next one, which ends that connection
(and only that one) with one log line.
"""
from __future__ import annotations

from typing import Any

from rpyc.lib.colls import RefCountingColl

#: Distinct objects one connection may hold references to. A client holds one or two.
MAX_OBJECTS = 1024


class TooManyObjectsError(RuntimeError):
    """A peer holds more server objects than :data:`MAX_OBJECTS`: its connection ends."""


class BoundedObjects(RefCountingColl):
    """rpyc's reference-counted object table, refusing a new object past ``limit`` entries."""

    __slots__ = ("limit",)

    def __init__(self, limit: int = MAX_OBJECTS) -> None:
        super().__init__()
        self.limit = limit

    def add(self, key: Any, obj: Any) -> None:
        with self._lock:
            slot = self._dict.get(key)
            if slot is not None:
                slot[1] += 1
                return
            if len(self._dict) >= self.limit:
                raise TooManyObjectsError(f"the peer holds {len(self._dict)} server objects it never released "
                                          f"(at most {self.limit})")
            self._dict[key] = [obj, 0]  # rpyc's own layout: [object, references beyond the first]


def bound_objects(conn: Any, limit: int = MAX_OBJECTS) -> None:
    """Give ``conn`` (a fresh ``rpyc.Connection``) a bounded object table."""
    conn._local_objects = BoundedObjects(limit)
