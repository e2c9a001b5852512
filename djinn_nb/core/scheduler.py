"""Who uses the device next: a fair, step-level scheduler, and per-call limits.

The engine used to hold one lock from a call's first step to its pause or end,
so a 500-token generation made a one-token fork wait for all of it. Here the
device is a *turn* that a run hands on between two of its steps
(``Stepper.between_steps``) whenever someone else is waiting:

- **Round-robin across owners, FIFO within an owner.** Waiting calls queue under
  their owner; the next turn goes to the owner after the last one served, in the
  order owners started waiting, and within an owner to its oldest waiter. A call
  that yields queues again behind everyone already waiting. So a fork, resume or
  short generation waits for about one step of each other owner's work.
- **A long step hands the turn on between its blocks** (``yield_turn``): a 900-token prompt pass
  or a wide batch is split where a breakpoint would split it, exactly, so a one-token fork waits
  for about one block of it rather than all of it.
- **Calls are stopped between steps** when their client has gone away or they
  ran past the server's per-call time cap (:class:`CallStopped`); a run cannot
  pause between steps (a pause needs a breakpoint's checkpoint), so the engine
  closes it.

Nothing here knows about rpyc: the serving layer describes a call with
:func:`call_scope` (its owner, how to tell the client is still there, a deadline).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable


from ..errors import QuotaError

__all__ = ["FairScheduler", "CallStopped", "call_scope"]

#: how long after someone last waited for the device it counts as contended
CONTENDED_SECONDS = 2.0


@dataclass
class _Call:
    owner: str
    alive: Callable[[], bool]
    deadline: float | None
    max_seconds: float | None


_local = threading.local()


class call_scope:  # noqa: N801 - used as a function: ``with call_scope(owner, alive, seconds):``
    """Describe the calling thread's request: its owner, whether its client is still there,
    and how long it may run; the scheduler consults it between steps. (A class, not a
    generator: it wraps every call that steps, and a generator-based context costs ~2 µs more.)"""

    __slots__ = ("_call", "_prev")

    def __init__(self, owner: str, alive: Callable[[], bool] = lambda: True, max_seconds: float | None = None):
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        self._call = _Call(owner, alive, deadline, max_seconds)
        self._prev: _Call | None = None

    def __enter__(self) -> None:
        self._prev = getattr(_local, "call", None)
        _local.call = self._call

    def __exit__(self, *exc: Any) -> None:
        _local.call = self._prev


def _current() -> _Call | None:
    return getattr(_local, "call", None)


class CallStopped(Exception):
    """A call stopped between two steps; ``error`` is what its client (if any) is told."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class _Ticket:
    __slots__ = ("owner", "granted")

    def __init__(self, owner: str):
        self.owner, self.granted = owner, False


class _Turn:
    """``with sched.turn(owner):`` (a class, not a generator: entered at every call and pause)."""

    __slots__ = ("sched", "owner")

    def __init__(self, sched: "FairScheduler", owner: str):
        self.sched, self.owner = sched, owner

    def __enter__(self) -> None:
        self.sched.acquire(self.owner)

    def __exit__(self, *exc: Any) -> None:
        self.sched.release()


@dataclass
class FairScheduler:
    """The device as a turn: ``with sched.turn(owner):`` holds it; ``between_steps`` hands it on.

    Also usable as a plain context manager (``with sched:``) for short device work (offload,
    restore, views), which queues under the calling request's owner.
    """

    _lock: threading.Lock = field(default_factory=threading.Lock)  # entered directly: cheaper than the condition
    _holder: _Ticket | None = None
    _waiting: dict[str, deque] = field(default_factory=dict)  # owner -> FIFO of tickets
    _order: deque = field(default_factory=deque)  # owners with waiters, in round-robin order
    handoffs: int = 0
    #: until when the device counts as contended: someone had to wait for it in the last
    #: ``CONTENDED_SECONDS`` (long steps then hand it on inside their blocks too)
    contended_until: float = 0.0

    def __post_init__(self) -> None:
        self._cv = threading.Condition(self._lock)

    def acquire(self, owner: str = "") -> _Ticket:
        with self._lock:
            t = _Ticket(owner)
            if self._holder is None and not self._order:
                t.granted, self._holder = True, t
                return t
            self._enqueue(t)
            while not t.granted:
                self._cv.wait()
            return t

    def release(self) -> None:
        with self._lock:
            self._holder = None
            if self._order:
                self._grant_next()

    def contended(self) -> bool:
        return time.monotonic() < self.contended_until

    def _enqueue(self, t: _Ticket) -> None:
        self.contended_until = time.monotonic() + CONTENDED_SECONDS
        q = self._waiting.get(t.owner)
        if q is None:
            q = self._waiting[t.owner] = deque()
            self._order.append(t.owner)
        q.append(t)

    def _grant_next(self) -> None:
        if not self._order:
            return
        owner = self._order.popleft()
        q = self._waiting[owner]
        t = q.popleft()
        if q:
            self._order.append(owner)  # its next waiter comes after every other owner's
        else:
            del self._waiting[owner]
        t.granted, self._holder = True, t
        self.handoffs += 1
        self._cv.notify_all()

    def waiting(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._waiting.values())

    def turn(self, owner: str) -> _Turn:
        return _Turn(self, owner)

    def __enter__(self) -> "FairScheduler":
        call = _current()
        self.acquire(call.owner if call else "")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def between_steps(self, run: Any) -> None:
        """Stop the call if its client left or its time is up; else let the next waiter take a step."""
        call = _current()
        if call is not None:
            if not call.alive():
                raise CallStopped(QuotaError(f"run {run.id}: the client went away; stopped at step {run.step}"))
            if call.deadline is not None and time.monotonic() > call.deadline:
                raise CallStopped(QuotaError(
                    f"run {run.id} stopped at step {run.step}: the call ran past the server's max_call_seconds "
                    f"({call.max_seconds:g} s) and its run was closed; use breakpoints or fewer max_new_tokens",
                    quota="max_call_seconds"))
        self.yield_turn(run.owner)

    def yield_turn(self, owner: str | None = None) -> None:
        """Let the next waiter have the device, then wait for a turn again (FIFO among ``owner``'s
        calls, after every other waiting owner); nothing when no one waits. Called between two
        steps, and inside a long step between two blocks (``Stepper.between_blocks``), where no
        trace is active and the run's own cache is all it has half-written."""
        if not self._order:  # read without the lock: a waiter missed here is seen at the next block
            return
        if owner is None:
            call = _current()
            owner = call.owner if call else ""
        with self._lock:
            if not self._order:
                return
            me = _Ticket(owner)
            self._holder = None
            self._enqueue(me)
            self._grant_next()
            while not me.granted:
                self._cv.wait()
