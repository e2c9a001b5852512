"""One connection's caller: who it is (after hello), the scope its calls run in, its quotas.

Why apart from ``service.py``: the service is the connection (what rpyc calls: hello, the
lookup of a call, connect and disconnect); this is what every call group needs of the caller,
given to each as a :class:`~djinn_nb.serving.parts.Caller` — nothing else of the service.
Quotas are checked here before a call allocates (``check_quota``, on the call's estimate) and
after (``admit``, on what its new runs hold), so every call is admitted the same way.
"""
from __future__ import annotations

import contextlib
import hmac
from typing import Any, Callable

from ..core.engine import Engine
from ..core.runs import Run
from ..core.scheduler import call_scope
from ..errors import AuthenticationError, DjinnError, QuotaError
from .state import ServerState
from .users import User

__all__ = ["CallContext"]


class CallContext:
    """A connection's caller; implements :class:`~djinn_nb.serving.parts.Caller`.

    ``alive`` tells whether the client is still connected (the scheduler stops a call whose client
    left).
    """

    def __init__(self, state: ServerState, alive: Callable[[], bool]):
        self.state = state
        self._alive = alive
        self.owner: str | None = None  # set by hello
        self.user: User | None = None

    def login(self, user: User | None) -> None:
        """Hello succeeded: calls run as ``user`` (None: the server has no users file)."""
        self.user, self.owner = user, user.name if user is not None else ""

    @property
    def engine(self) -> Engine:
        return self.state.engine

    @property
    def admin(self) -> bool:
        return self.user is not None and self.user.admin

    def who(self) -> str:
        if self.owner is None:
            raise AuthenticationError("call hello(protocol, token) first")
        user, users = self.user, self.state.auth.users  # one snapshot: a reload swaps the whole dict
        if user is not None and users.get(user.name) is not user:  # the users file was reloaded
            now = users.get(user.name)
            if now is None or not hmac.compare_digest(now.token_sha256, user.token_sha256):
                raise AuthenticationError("this server no longer accepts your token (its users file changed); "
                                          "connect again with a current one")
            self.user = now  # its quotas as the file now says
        return self.owner

    def caller(self) -> Any:
        """Every call runs as its caller (after hello): a lens, an attention read, a lens_grid or an
        offload then waits its turn on the device among that user's calls, not as an anonymous
        one ahead of or behind everyone's. Calls that step set a deadline too (``scope``)."""
        if self.owner is None:
            return contextlib.nullcontext()
        return call_scope(self.owner, self._alive)

    def scope(self) -> Any:
        limits = self.state.limits
        return call_scope(self.who(), self._alive, getattr(limits, "max_call_seconds", None))

    def check_quota(self, max_new_tokens: int | None = None, new_runs: int = 1, adding: int = 0) -> None:
        """Refuse, before anything changes, a call that would take this user (or the server) past a
        quota: its steps, its user's runs (``new_runs`` more), and the bytes all runs hold plus
        ``adding``, the call's estimate of what it will allocate (see ``ServerState.kv_bytes``)."""
        owner, user, limits = self.who(), self.user, self.state.limits
        steps = getattr(limits, "max_call_steps", None)
        if steps is not None and type(max_new_tokens) is int and max_new_tokens > steps:
            raise QuotaError(f"quota max_call_steps: a call may run at most {steps} steps; "
                             f"asked for max_new_tokens={max_new_tokens}", quota="max_call_steps")
        cap = user.max_runs if user is not None and user.max_runs is not None else getattr(limits, "user_max_runs", None)
        if new_runs and cap is not None:
            held = len(self.engine.runs(owner))
            if held + new_runs > cap:
                more = f"; {new_runs} more would pass it" if new_runs > 1 else ""
                raise QuotaError(f"quota max_runs: you hold {held} of {cap} runs{more}; close some first",
                                 quota="max_runs")
        self.check_bytes(owner, adding)

    def check_bytes(self, owner: str, adding: int = 0) -> None:
        user, limits = self.user, self.state.limits
        own = user is not None and user.max_paused_bytes is not None
        cap = user.max_paused_bytes if own and user is not None else getattr(limits, "user_max_held_bytes", None)
        need = f" and this call would add about {adding}" if adding else ""
        if cap is not None:
            held = self.state.held_bytes(owner)
            if held + adding > cap:
                name = "max_paused_bytes" if own else "user_max_held_bytes"
                raise QuotaError(f"quota {name}: your runs hold {held} bytes{need}, over your {cap}; "
                                 "close or shorten some runs", quota=name)
        total = getattr(limits, "max_held_bytes", None)
        if total is not None:
            held = self.state.held_bytes()
            if held + adding > total:
                # an ordinary user is not told what everyone else holds
                numbers = f" ({held} bytes held{need}, of {total})" if self.admin else ""
                raise QuotaError(f"quota max_held_bytes: the server's runs are at its limit of what they may "
                                 f"hold{numbers}; try again after runs are closed, or ask for less",
                                 quota="max_held_bytes")

    def admit(self, run: Run) -> None:
        """A new run that took its owner (or the server) past a byte quota is closed and refused."""
        self.admit_all([run])

    def admit_all(self, runs: list[Run]) -> None:
        """New runs of one call that took their owner (or the server) past a byte quota are all
        closed and the call refused: a caller never holds part of a refused batch."""
        try:
            self.check_bytes(self.who())
        except QuotaError as e:
            for run in runs:
                with contextlib.suppress(DjinnError):
                    self.engine.close(run.id, run.owner)
            self.state.freed.set()
            raise QuotaError(f"{e}; the {len(runs)} run(s) this call made were closed" if len(runs) > 1 else str(e),
                             quota=e.quota) from None
