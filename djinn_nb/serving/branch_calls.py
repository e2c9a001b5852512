"""The exposed ``diff``: two branches of one prompt compared on the server, in one request.

A class given the caller (a :class:`~djinn_nb.serving.parts.Caller`) and the texts replies carry
(:class:`~djinn_nb.serving.parts.Replies`), kept apart so each module has one job (the computation
is ``core/branches.py``). The call is admitted before it allocates: its
recomputation holds a copy of a cache as long as the longer branch and both branches' states at
one step (``branches.work_bytes``), counted against its caller's byte quota and the server's, and
its steps against ``max_call_steps``; it runs under the caller's scope (a turn among that user's
calls, the call's time cap). Both runs must be the caller's.
"""
from __future__ import annotations

from typing import Any

from ..core import branches
from ..errors import QuotaError
from ..wire.messages import DiffReply, DiffRequest
from .. import wire
from .parts import Caller, Replies

__all__ = ["BranchCalls"]


class BranchCalls:
    """``diff``."""

    def __init__(self, caller: Caller, replies: Replies):
        self._caller = caller
        self._replies = replies

    def diff(self, request_json: Any) -> dict[str, Any]:
        """Compare two runs of one prompt (a ``DiffRequest``); a ``DiffReply``."""
        owner = self._caller.who()
        req = DiffRequest.from_json(wire.loads(request_json, "diff request"))
        engine = self._caller.engine
        a, b = engine.get(req.a, owner), engine.get(req.b, owner)
        layers = req.layers if req.layers is not None else list(range(engine.num_layers))
        steps = min(len(a.token_ids), len(b.token_ids))
        if isinstance(req.steps, list) and len(req.steps) == 2 and all(type(s) is int for s in req.steps):
            steps = max(0, min(steps, req.steps[1] - req.steps[0]))
        if steps > (getattr(self._caller.state.limits, "max_call_steps", None) or steps):  # 2 x steps forwards, one per branch
            raise QuotaError(f"quota max_call_steps: a diff recomputes up to {steps} steps of each run, over "
                             f"{self._caller.state.limits.max_call_steps}; pass steps=[start, stop]", quota="max_call_steps")
        vocab, hidden = engine.anatomy.head_weight.shape
        need = branches.work_bytes(len(a.prompt_ids), steps, len(layers) if isinstance(layers, list) else 0,
                                   int(hidden), int(vocab), self._caller.state.kv_per_position,
                                   engine.anatomy.head_weight.element_size())
        self._caller.check_quota(new_runs=0, adding=need)
        with self._caller.scope():
            found = branches.diff(engine, a.id, b.id, owner, req.layers, req.site, req.k, req.steps)
        tokens_a, tokens_b = found.tokens_a, found.tokens_b
        named = [i for rows in (found.topk_a or [], found.topk_b or []) for i, _ in rows]
        named += [i for lens in (found.lens_a or [], found.lens_b or []) for row in lens for i, _ in row]
        texts = self._replies.token_texts(list(a.prompt_ids) + tokens_a + tokens_b + named)
        reply = DiffReply(
            a=a.id, b=b.id, prompt_len=len(a.prompt_ids), tokens_a=tokens_a, tokens_b=tokens_b,
            layers=found.layers, steps=found.steps, site=found.site, divergence=found.divergence,
            distance=found.distance, norm=found.norm, kl=found.kl, source=found.source,
            unreproduced_a=found.unreproduced_a, unreproduced_b=found.unreproduced_b,
            topk_a=_pairs(found.topk_a), topk_b=_pairs(found.topk_b),
            lens_a=None if found.lens_a is None else [_pairs(r) or [] for r in found.lens_a],
            lens_b=None if found.lens_b is None else [_pairs(r) or [] for r in found.lens_b],
            text_ids=list(texts), texts=list(texts.values()))
        return reply.to_json()


def _pairs(rows: list[tuple[int, float]] | None) -> list[list[float]] | None:
    return None if rows is None else [[i, p] for i, p in rows]
