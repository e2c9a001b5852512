"""The exposed calls that read a run without moving it: its activation, logits, attention, the
logit lens (at a pause, and over every layer of a prompt pass), and what its watches recorded.

A class given the caller (a :class:`~djinn_nb.serving.parts.Caller`), the texts replies carry
(:class:`~djinn_nb.serving.parts.Replies`) and the tensors out (:class:`~djinn_nb.serving.parts.Tensors`:
inline, or offered on the side channel when the client asks and they are large), kept apart from
the connection (``service.py``) so each module has one job. A read changes no run; one that
computes takes the device turn as its caller (the service's ``_reply``); ``lens_grid``, which
makes a prompt pass's cache, is admitted on it first.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.runs import activation_stats
from ..errors import BadRequestError
from ..wire.calls import LensGridRequest
from ..wire.messages import LensReply, WatchHit
from .. import wire
from .parts import Caller, Replies, Tensors
from .replies import _str
from .run_calls import prompt_positions

if TYPE_CHECKING:  # pragma: no cover
    from ..core.engine import Engine

__all__ = ["ReadCalls"]


class ReadCalls:
    """``activation``, ``logits``, ``attention``, ``lens``, ``lens_grid``, ``watched``, ``watched_activation``."""

    def __init__(self, caller: Caller, replies: Replies, tensors: Tensors):
        self._caller = caller
        self._replies = replies
        self._tensors = tensors

    @property
    def _engine(self) -> Engine:
        return self._caller.engine

    def activation(self, run_id: Any, original: Any = False, bulk: Any = False) -> Any:
        """The paused activation: ``(header, bytes)``, or ``{"bulk": ticket}`` (see sidechannel.py)."""
        if type(original) is not bool:
            raise BadRequestError("original must be true or false")
        t = self._engine.activation(_str(run_id, "run id"), self._caller.who(), original)
        return self._tensors.send(t, bulk)

    def logits(self, run_id: Any, step: Any = None, bulk: Any = False) -> Any:
        """Next-token logits of the last finished step, or of ``step`` if the run recorded them."""
        run = self._engine.get(_str(run_id, "run id"), self._caller.who())
        with run.lock:
            if step is None:
                if run.last_logits is None:
                    raise BadRequestError(f"run {run.id} has finished no step yet")
                return self._tensors.send(run.last_logits, bulk)
            if type(step) is not int or not 0 <= step < len(run.logits):
                raise BadRequestError(
                    f"step {step!r} not recorded: run {run.id} has logits for steps 0..{len(run.logits) - 1} "
                    "(start it with record_logits=True)"
                )
            return self._tensors.send(run.logits[step], bulk)

    def attention(self, run_id: Any, bulk: Any = False) -> Any:
        """Block N's attention probabilities at the paused step, (batch, heads, queries, keys)."""
        return self._tensors.send(self._engine.attention(_str(run_id, "run id"), self._caller.who()), bulk)

    def lens(self, run_id: Any, k: Any = 5) -> dict[str, Any]:
        """The logit lens at a residual-stream pause: per position, top-k ids and probabilities, and
        the text of each id it names and of the run's own tokens (``text_ids``/``texts``: the
        table the caller shows next, with its positions' tokens)."""
        run = self._engine.get(_str(run_id, "run id"), self._caller.who())
        top_ids, probs = self._engine.lens(run.id, k, self._caller.who())
        ids = top_ids.tolist()
        texts = self._replies.token_texts([i for row in ids for i in row] + list(run.prompt_ids) + list(run.token_ids))
        return LensReply(ids, probs.tolist(), list(texts), list(texts.values())).to_json()

    def lens_grid(self, request_json: Any) -> tuple[dict[str, Any], bytes]:
        """{prompt, k, site}: the lens at every layer of one prompt pass, (layers, positions, k): the
        headers ``{"ids", "probs"}`` and one payload, the ids' bytes then the probabilities'."""
        caller = self._caller
        caller.who()
        req = LensGridRequest.from_json(wire.loads(request_json, "lens grid request"))
        # admitted on its prompt pass's cache (one hidden state per layer rides with it)
        caller.check_quota(1, new_runs=0, adding=caller.state.kv_bytes(max(1, prompt_positions(req.prompt))))
        ids, probs = self._engine.lens_grid(req.prompt, req.k, req.site)
        # as tensors, not JSON lists: layers x positions x k numbers cost ~6 ms of JSON a call
        (ids_meta, ids_bytes), (probs_meta, probs_bytes) = wire.encode_tensor(ids), wire.encode_tensor(probs)
        return {"ids": ids_meta, "probs": probs_meta}, ids_bytes + probs_bytes

    def watched(self, run_id: Any) -> list[dict[str, Any]]:
        """Statistics of every watch hit so far, a ``WatchHit`` each: layer, site, step, shape and norm/mean/max."""
        hits = self._engine.watched(_str(run_id, "run id"), self._caller.who())
        return [WatchHit(index=i, layer=h.layer, site=h.site, step=h.step, shape=list(h.tensor.shape),
                         **activation_stats(h.tensor)).to_json() for i, h in enumerate(hits)]

    def watched_activation(self, run_id: Any, index: Any, bulk: Any = False) -> Any:
        """The value watch hit ``index`` recorded."""
        hits = self._engine.watched(_str(run_id, "run id"), self._caller.who())
        if type(index) is not int or not 0 <= index < len(hits):
            raise BadRequestError(f"watch index must be an integer in 0..{len(hits) - 1}, got {index!r}")
        return self._tensors.send(hits[index].tensor, bulk)
