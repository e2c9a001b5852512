"""The exposed calls that start, move, edit, list and close runs: the debugger's own loop.

A class given the caller (a :class:`~djinn_nb.serving.parts.Caller`: its name, scope, quotas and
admission), what replies carry (:class:`~djinn_nb.serving.parts.Replies`) and the requests'
checks (:class:`~djinn_nb.serving.parts.Requests`), kept apart from the connection
(``service.py``) so each module has one job. A call that makes a run is admitted on its
estimate before it allocates and on what the run holds after; one that steps runs under the
caller's scope; the residency budget applies after each call that left a run paused or done.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.specs import Edit, Sampling
from ..wire.calls import ClosedReply
from ..wire.messages import EditRequest, ForkRequest, GenerateRequest, ServerInfo
from .. import wire
from . import run_views
from .parts import Caller, Replies, Requests
from .replies import _since, _str

if TYPE_CHECKING:  # pragma: no cover
    from ..core.engine import Engine

__all__ = ["RunCalls", "prompt_positions"]


def prompt_positions(prompt: Any) -> int:
    """At most how many positions a prompt takes: its ids, or a text's UTF-8 bytes (a byte-level
    tokenizer makes at most one token per byte)."""
    if isinstance(prompt, str):
        return len(prompt.encode("utf-8", "surrogatepass"))
    return len(prompt) if isinstance(prompt, list) else 0


class RunCalls:
    """``info``, ``generate``, ``resume``, ``fork``, ``edit``, ``reset_edit``, ``offload``, ``status``,
    ``summary``, ``runs``, ``close``."""

    def __init__(self, caller: Caller, replies: Replies, requests: Requests):
        self._caller = caller
        self._replies = replies
        self._requests = requests

    @property
    def _engine(self) -> Engine:
        return self._caller.engine

    def _edit_of(self, request_json: Any, act: Any, add: Any) -> Edit:
        return self._requests.edit(EditRequest.from_json(wire.loads(request_json, "edit")), act, add)

    def info(self) -> dict[str, Any]:
        """The model served and how (a ``ServerInfo``)."""
        self._caller.who()
        return ServerInfo(**self._engine.info()).to_json()

    def generate(self, request_json: Any) -> dict[str, Any]:
        """Start a run (a ``GenerateRequest``); its summary at its first pause or its end."""
        caller = self._caller
        owner = caller.who()
        req = GenerateRequest.from_json(wire.loads(request_json, "generate request"))
        self._requests.check_features(req.breakpoints)
        caller.check_quota(req.max_new_tokens,
                           adding=caller.state.kv_bytes(prompt_positions(req.prompt) + req.max_new_tokens))
        with caller.scope():
            run = self._engine.generate(
                req.prompt,
                req.max_new_tokens,
                req.breakpoints,
                Sampling(req.temperature, req.top_k, req.seed),
                owner=owner,
                record_logits=req.record_logits,
                watches=req.watches,
            )
        caller.admit(run)
        caller.state.after_change(run)
        return self._replies.summary(run)

    def resume(self, run_id: Any, since: Any = None, request_json: Any = None, act: Any = None,
               add: Any = None) -> dict[str, Any]:
        """Continue a paused run, after an ``EditRequest`` if one is given (tensors inline in
        ``act``/``add`` or by ticket); its ``RunBrief`` (``since``: token ids the client holds)."""
        caller = self._caller
        owner = caller.who()
        edit = None if request_json is None else self._edit_of(request_json, act, add)
        since = _since(since)
        run = self._engine.get(_str(run_id, "run id"), owner)
        caller.check_quota(new_runs=0, adding=caller.state.kv_bytes(run.max_new_tokens - run.step))
        with caller.scope():
            run = self._engine.resume(_str(run_id, "run id"), edit, owner)
        caller.state.after_change(run)
        return self._replies.brief(run, since)

    def fork(self, run_id: Any, request_json: Any, act: Any = None, add: Any = None,
             since: Any = None) -> dict[str, Any]:
        """A new run from a paused one's checkpoint, after a ``ForkRequest``; its ``RunBrief``
        (``since``: how many of the parent's token ids the client holds)."""
        caller = self._caller
        owner = caller.who()
        since = _since(since)
        req = ForkRequest.from_json(wire.loads(request_json, "fork request"))
        self._requests.check_features(req.breakpoints)
        edit = self._requests.edit(req.edit, act, add)
        parent = self._engine.get(_str(run_id, "run id"), owner)
        limit = req.max_new_tokens if req.max_new_tokens is not None else parent.max_new_tokens
        caller.check_quota(limit, adding=caller.state.kv_bytes(len(parent.prompt_ids) + limit))
        with caller.scope():
            run = self._engine.fork(parent.id, edit, req.breakpoints, owner, req.max_new_tokens)
        caller.admit(run)
        caller.state.after_change(run)
        return self._replies.closed_brief(run, since) if req.close else self._replies.brief(run, since, new=True)

    def edit(self, run_id: Any, request_json: Any, act: Any = None, add: Any = None,
             since: Any = None) -> dict[str, Any]:
        """Change a paused run's activation (an ``EditRequest``); its ``RunBrief``."""
        owner = self._caller.who()
        edit = self._edit_of(request_json, act, add)
        since = _since(since)
        return self._replies.brief(self._engine.edit(_str(run_id, "run id"), edit, owner), since)

    def reset_edit(self, run_id: Any, since: Any = None) -> dict[str, Any]:
        """Undo a paused run's edits; its ``RunBrief``."""
        since = _since(since)
        return self._replies.brief(self._engine.reset_edit(_str(run_id, "run id"), self._caller.who()), since)

    def offload(self, run_id: Any, since: Any = None) -> dict[str, Any]:
        """Move a paused run's state to host memory; later calls bring it back."""
        since = _since(since)
        return self._replies.brief(self._engine.offload(_str(run_id, "run id"), self._caller.who()), since)

    def status(self, run_id: Any, since: Any = None) -> dict[str, Any]:
        """Where the run is now, as a ``RunBrief`` (``since``: token ids the client holds)."""
        since = _since(since)
        return self._replies.brief(self._engine.get(_str(run_id, "run id"), self._caller.who()), since)

    def summary(self, run_id: Any) -> dict[str, Any]:
        """Everything about the run (a ``RunSummary``): tokens, prompt, breakpoints, the paused
        activation's statistics, the top-k, bytes held, timings."""
        return self._replies.summary(self._engine.get(_str(run_id, "run id"), self._caller.who()))

    def runs(self) -> list[dict[str, Any]]:
        """This user's runs, a ``RunRow`` each; an admin's listing has every user's."""
        owner = self._caller.who()
        mine = self._engine.all_runs() if self._caller.admin else self._engine.runs(owner)
        runs = sorted(mine, key=lambda r: int(r.id[1:].split("-")[0]))
        return [run_views.row(r).to_json() for r in runs]

    def close(self, run_id: Any) -> dict[str, Any]:
        """Free a run (an admin closes any run, as its owner would)."""
        owner = self._caller.who()
        run_id = _str(run_id, "run id")
        if self._caller.admin:  # an admin closes any run, as its owner would
            owner = next((r.owner for r in self._engine.all_runs() if r.id == run_id), owner)
        self._engine.close(run_id, owner)
        self._caller.state.freed.set()
        return ClosedReply(run_id).to_json()
