"""The exposed calls across runs and over time: batched forks, token probabilities, stepping,
rewind, the token history.

A class given the caller (a :class:`~djinn_nb.serving.parts.Caller`: its name, scope, quotas
and admission), what replies carry (:class:`~djinn_nb.serving.parts.Replies`) and the requests'
checks (:class:`~djinn_nb.serving.parts.Requests`), kept apart so each module has one job. Calls
that run steps do so under the caller's scheduling scope and quotas, as ``generate`` does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.forking import ForkSpec
from ..core.runs import Run
from ..core.patchgrid import grid_spec
from ..core.stepthrough import step_through
from ..core.tracing import check_grid
from ..core import views
from ..errors import BadRequestError
from ..wire.calls import CausalTraceReply, CausalTraceRequest, TokenProbsRequest
from ..wire.messages import EditRequest, ForkRequest
from .. import wire
from .parts import Caller, Replies, Requests
from .replies import _since, _str

if TYPE_CHECKING:  # pragma: no cover
    from ..core.engine import Engine

__all__ = ["DebugCalls", "resolve_answer"]


class DebugCalls:
    """``fork_many``, ``token_probs``, ``next_layer``, ``next_step``, ``step_through``, ``rewind``,
    ``causal_trace``, ``history``."""

    def __init__(self, caller: Caller, replies: Replies, requests: Requests):
        self._caller = caller
        self._replies = replies
        self._requests = requests

    @property
    def _engine(self) -> Engine:
        return self._caller.engine

    def _stepped(self, run: Run, since: int | None) -> dict[str, Any]:
        """A run a call stepped: the residency budget applied, then its ``RunBrief``."""
        self._caller.state.after_change(run)
        return self._replies.brief(run, since)

    def fork_many(self, run_id: Any, requests_json: Any, payloads: Any = (),
                  since: Any = None) -> list[dict[str, Any]]:
        """Several forks of one checkpoint (a list of ``ForkRequest``), run as a batch where they can be.

        ``payloads``: empty, or two entries per fork (its activation and add bytes, or None).
        Answers a ``RunBrief`` per fork (``since``: how many of the parent's token ids the client holds).
        """
        owner = self._caller.who()
        since = _since(since)
        reqs = wire.loads(requests_json, "fork_many request")
        if not isinstance(reqs, list) or not reqs:
            raise BadRequestError("fork_many takes a non-empty list of fork requests")
        if type(payloads) is not tuple or len(payloads) not in (0, 2 * len(reqs)) or any(
            p is not None and type(p) is not bytes for p in payloads
        ):
            raise BadRequestError("payloads must be a tuple of bytes or None, two per fork (or empty)")
        specs, closes, probs_of = [], [], []
        for i, obj in enumerate(reqs):
            req = ForkRequest.from_json(obj)
            if req.probs_of is not None:
                vocab = int(getattr(self._engine.model.config, "vocab_size", 0)) or 1
                if len(req.probs_of) > 64 or any(not 0 <= t < vocab for t in req.probs_of):
                    raise BadRequestError(f"fork {i}: probs_of must be at most 64 token ids in 0..{vocab - 1}")
            probs_of.append(req.probs_of)
            self._requests.check_features(req.breakpoints)
            act, add = (payloads[2 * i], payloads[2 * i + 1]) if payloads else (None, None)
            specs.append(ForkSpec(self._requests.edit(req.edit, act, add), req.breakpoints, req.max_new_tokens))
            closes.append(req.close)
        parent = self._engine.get(_str(run_id, "run id"), owner)
        limit = max((s.max_new_tokens or parent.max_new_tokens) for s in specs)
        # admitted on its estimate before any fork exists: every fork may come to hold a whole cache
        self._caller.check_quota(limit, new_runs=len(specs),
                          adding=len(specs) * self._caller.state.kv_bytes(len(parent.prompt_ids) + limit))
        with self._caller.scope():
            runs = self._engine.fork_many(parent.id, specs, owner)
        self._caller.admit_all(runs)
        for run in runs:
            self._caller.state.after_change(run)
        probs = [None if ids is None else views.probs_of(run, ids) for run, ids in zip(runs, probs_of)]
        briefs = [self._replies.closed_brief(run, since) if close else self._replies.brief(run, since, new=True)
                  for run, close in zip(runs, closes)]
        for brief, p in zip(briefs, probs):
            if p is not None:
                brief["probs"] = p
        return briefs

    def token_probs(self, request_json: Any) -> list[float]:
        """{runs: [ids], token: id}: each run's probability of ``token`` at its last finished step."""
        req = TokenProbsRequest.from_json(wire.loads(request_json, "token_probs request"))
        if len(req.runs) > 4096:
            raise BadRequestError("token_probs takes at most 4096 runs at once")
        ids = [_str(r, "run id") for r in req.runs]
        return self._engine.token_probs(ids, req.token, self._caller.who())

    def next_layer(self, run_id: Any, since: Any = None) -> dict[str, Any]:
        """Pause at the next block's output in the same step (the run's breakpoints apply afterwards)."""
        since = _since(since)
        self._caller.check_quota(new_runs=0)
        with self._caller.scope():
            return self._stepped(self._engine.next_layer(_str(run_id, "run id"), self._caller.who()), since)

    def next_step(self, run_id: Any, since: Any = None) -> dict[str, Any]:
        """Pause at the same layer and site one step later (the run's breakpoints apply afterwards)."""
        since = _since(since)
        self._caller.check_quota(new_runs=0)
        with self._caller.scope():
            return self._stepped(self._engine.next_step(_str(run_id, "run id"), self._caller.who()), since)

    def step_through(self, run_id: Any, steps: Any, since: Any = None, request_json: Any = None,
                     act: Any = None, add: Any = None) -> dict[str, Any]:
        """The ``EditRequest`` (or none) applied at the paused site in each of the next ``steps`` steps,
        on the server (core/stepthrough.py); the run's ``RunBrief`` there, or at its end."""
        owner = self._caller.who()
        edit = None if request_json is None else self._requests.edit(
            EditRequest.from_json(wire.loads(request_json, "edit")), act, add)
        since = _since(since)
        if isinstance(steps, bool) or type(steps) is not int or steps < 1:
            raise BadRequestError(f"steps must be a positive integer, not {steps!r}"[:200])
        run = self._engine.get(_str(run_id, "run id"), owner)
        self._caller.check_quota(steps, new_runs=0,
                                 adding=self._caller.state.kv_bytes(max(0, min(steps, run.max_new_tokens - run.step))))
        with self._caller.scope():
            run = step_through(self._engine, self._engine.forks, run.id, steps, edit, owner)
        return self._stepped(run, since)

    def rewind(self, run_id: Any, step: Any, layer: Any = None, site: Any = None,
               since: Any = None) -> dict[str, Any]:
        """A new run paused at (layer, site) of an earlier ``step`` of a paused or finished run
        (``since``: how many of the source's token ids the client holds)."""
        owner = self._caller.who()
        since = _since(since)
        if type(step) is not int or (layer is not None and type(layer) is not int):
            raise BadRequestError("step (and layer) must be integers")
        if site is not None and type(site) is not str:
            raise BadRequestError("site must be a string")
        source = self._engine.get(_str(run_id, "run id"), owner)
        self._caller.check_quota(adding=self._caller.state.kv_bytes(len(source.prompt_ids) + step))
        with self._caller.scope():
            run = self._engine.rewind(source.id, step, layer, site, owner)
        self._caller.admit(run)
        self._caller.state.after_change(run)
        return self._replies.brief(run, since, new=True)

    def causal_trace(self, request_json: Any) -> dict[str, Any]:
        """ROME's grid in one call: {clean, corrupted (texts or ids), answer (id, text of one token,
        or null), layers, positions (lists or null), site, heads ("all", a list or null: site z),
        cells ([layer, column] pairs or null)}. Answers the rows (null: a cell not computed), both runs'
        own probabilities, the answer and the clean prompt's ids, with the texts a plot labels."""
        owner = self._caller.who()
        req = CausalTraceRequest.from_json(wire.loads(request_json, "causal_trace request"))
        engine = self._engine
        clean, corrupted = engine.encode(req.clean), engine.encode(req.corrupted)
        answer = resolve_answer(engine, req.answer)
        layers, positions = check_grid(engine.num_layers, len(clean), req.layers, req.positions)
        spec = grid_spec(req.site, layers, positions, req.heads, req.cells, engine.parts[0].num_heads)
        # two runs, and a batch of every column's start with its own copy of the cache, at once
        self._caller.check_quota(1, new_runs=2, adding=(len(spec.columns) + 3) * self._caller.state.kv_bytes(len(clean) + 1))
        with self._caller.scope():
            grid = engine.causal_trace(clean, corrupted, answer, layers, positions, spec.site, owner, spec=spec)
        texts = self._replies.token_texts([grid.answer] + clean)
        return CausalTraceReply(rows=grid.rows, clean_prob=grid.clean_prob, corrupt_prob=grid.corrupt_prob,
                                answer=grid.answer, layers=spec.traced_layers(), positions=positions,
                                heads=spec.heads, clean_ids=clean, text_ids=list(texts),
                                texts=list(texts.values())).to_json()

    def history(self, run_id: Any) -> list[dict[str, Any]]:
        """One record per generated token: step, token_id, topk [(id, prob)], entropy, time_s, and with
        a tokenizer the texts ``token`` and ``topk_tokens``."""
        return self._replies.history(self._engine.history(_str(run_id, "run id"), self._caller.who()))


def resolve_answer(engine: Any, answer: Any) -> Any:
    """A text of one token as its id (other values are checked where they are used)."""
    if isinstance(answer, str):
        if engine.tokenizer is None:
            raise BadRequestError("this model has no tokenizer: give the answer as a token id")
        ids = engine.token_ids(answer)
        if len(ids) != 1:
            raise BadRequestError(f"answer {answer!r} is {len(ids)} tokens; pass one token (or its id)")
        return ids[0]
    return answer

