"""``Run``: a handle on a generation whose state lives on the server.

A step, fork or refresh answers a :class:`~djinn_nb.wire.messages.RunBrief`: where the
run is and the token ids this client does not have yet, a few dozen bytes — a
pause at every step then costs little more than rpyc's own round trip. The rest of
a :class:`~djinn_nb.wire.messages.RunSummary` (the paused activation's statistics, the
top-k, bytes held, timings, breakpoints) is fetched the first time a property asks
for it after the run changed, and kept while the run's version stays the same.
Tensors cross only when asked for (``activation()``, ``logits()``).

Texts come with the replies that the caller reads them from next (see
:mod:`djinn_nb.serving.text_calls`) and the client keeps them, so ``run.fork(...).text`` is one
round trip. ``fork(close=True)`` looks at a continuation without keeping it: the fork is closed
on the server in the same call, its tokens, text and history in the reply.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ..errors import BadRequestError, DjinnError, ProtocolError
from ..states import RunState
from ..wire.calls import ClosedReply, read_reply
from ..wire.messages import LensReply, RunBrief, RunSummary, WatchHit, history_records
from .. import wire
from .edits import FORK_ARGS, edit_request, fork_request
from .features import FeatureRows

if TYPE_CHECKING:  # pragma: no cover
    import torch  # imported at the first tensor: text-only use never loads it
    from .connection import Client

__all__ = ["Run"]


def _tokens(brief: RunBrief, base: list[int]) -> list[int]:
    """A run's token ids from a brief: the first ``keep`` of those the client had, then the new ones."""
    if brief.keep > len(base):
        raise ProtocolError(f"the server kept {brief.keep} token ids of the {len(base)} this client holds")
    return base[:brief.keep] + brief.tokens if brief.keep else list(brief.tokens)


def _take_texts(client: "Client", records: list[dict[str, Any]]) -> None:
    """Keep the token texts that history records carry (the next display reads them)."""
    texts = {}
    for r in records:
        if type(r.get("token")) is str and type(r.get("topk_tokens")) is list:
            texts[r["token_id"]] = r["token"]
            texts.update(zip((t for t, _ in r["topk"]), r["topk_tokens"]))
    client._remember((), None, texts)


class LensRows(list):
    """``run.lens()``: per position, ``[(token_id, probability), ...]``; its repr rounds the probabilities."""

    def __repr__(self) -> str:
        rows = ",\n ".join("[" + ", ".join(f"({i}, {p:.4g})" for i, p in row) + "]" for row in self)
        return f"[{rows}]"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


class Run:
    """A generation on the server: paused at a breakpoint, done, failed or closed."""

    def __init__(self, client: "Client", summary: RunSummary):
        self._client = client
        self._s = summary
        self._v = summary.v  # the run's version at the last reply; details are current when it is _s.v
        self._history: tuple[int, list[dict[str, Any]]] | None = None  # (version, records) a reply carried
        self._probs: list[float] | None = None  # a fork_many reply's probabilities of its probs_of tokens
        #: token id -> probability at its last finished step, for the tokens ``fork_many(probs_of=...)`` named
        self.probs_of: dict[int, float] = {}
        client._remember(summary.token_ids, summary.text)

    @classmethod
    def _from_brief(cls, client: "Client", reply: Any, source: "Run") -> "Run":
        """A new run (fork, rewind) from its brief; its prompt is its source's, its details come on demand."""
        b = RunBrief.from_json(reply)
        src = source._s
        run = cls(client, RunSummary(id=b.id, state=b.state, step=b.step, layer=b.layer, site=b.site,
                                     token_ids=_tokens(b, src.token_ids), prompt_ids=list(src.prompt_ids),
                                     max_new_tokens=b.max_new_tokens, parent=b.parent, offloaded=b.offloaded,
                                     error=b.error, v=-1, timings_ms=b.timings_ms))
        run._v = b.v
        run._probs = b.probs
        client._remember(run._s.token_ids, b.text)
        if b.history is not None:  # a fork closed at once: its history can no longer be asked for
            run._history = (b.v, b.history)
            _take_texts(client, b.history)
        return run

    def _update(self, reply: Any) -> "Run":
        """Take in a brief about this run."""
        b, s = RunBrief.from_json(reply), self._s
        if b.id != s.id:
            raise ProtocolError(f"the server answered about run {b.id} for run {s.id}")
        s.token_ids = _tokens(b, s.token_ids)
        s.state, s.step, s.layer, s.site, s.max_new_tokens = b.state, b.step, b.layer, b.site, b.max_new_tokens
        s.parent, s.offloaded, s.error, s.timings_ms = b.parent, b.offloaded, b.error, b.timings_ms
        self._v = b.v
        self._client._remember(s.token_ids, b.text)
        return self

    def _details(self) -> RunSummary:
        """The whole summary, asked for again only if the run changed since it was read."""
        if self._s.v != self._v and self._s.state != RunState.CLOSED:
            self._s = RunSummary.from_json(self._client._call("summary", self.id))
            self._v = self._s.v
            self._client._remember(self._s.token_ids, self._s.text)
        return self._s

    def _since(self) -> int:
        return len(self._s.token_ids)

    # ----- where it is ------------------------------------------------------------
    @property
    def id(self) -> str:
        return self._s.id

    @property
    def state(self) -> RunState:
        return self._s.state

    @property
    def paused(self) -> bool:
        return self._s.state == RunState.PAUSED

    @property
    def done(self) -> bool:
        return self._s.state == RunState.DONE

    @property
    def layer(self) -> int | None:
        return self._s.layer

    @property
    def site(self) -> str | None:
        """Where in block ``layer`` the run paused: resid_pre, z, attn_out, resid_mid, mlp_out, resid_post."""
        return self._s.site

    @property
    def step(self) -> int:
        return self._s.step

    @property
    def max_new_tokens(self) -> int:
        return self._s.max_new_tokens

    @property
    def token_ids(self) -> list[int]:
        return list(self._s.token_ids)

    @property
    def text(self) -> str:
        return self._client.decode(self.token_ids)

    @property
    def prompt_len(self) -> int:
        return self._s.prompt_len

    @property
    def prompt_ids(self) -> list[int]:
        return list(self._s.prompt_ids)

    @property
    def breakpoints(self) -> list[dict[str, Any]]:
        return [dict(b) for b in self._details().breakpoints]

    @property
    def client(self) -> "Client":
        """The client this run is reached through."""
        return self._client

    @property
    def parent(self) -> str | None:
        return self._s.parent

    @property
    def error(self) -> str | None:
        return self._s.error

    @property
    def topk(self) -> list[tuple[int, float]] | None:
        """The distribution the last generated token was chosen from: ``(token id, log-probability)``
        of its most likely tokens, most likely first (natural log: ``math.exp`` gives the
        probability). At a pause in step k that is step k-1's output (step k's is not computed
        yet); ``None`` before the first token. ``run.history()`` has it for every step."""
        topk = self._details().topk
        return [(int(i), float(p)) for i, p in topk] if topk else None

    @property
    def activation_stats(self) -> dict[str, Any] | None:
        """Shape, dtype, norm/mean/max overall and per position of the paused activation."""
        return self._details().activation

    @property
    def bytes_held(self) -> int:
        return self._details().bytes_held

    @property
    def offloaded(self) -> bool:
        return self._s.offloaded

    @property
    def timings_ms(self) -> dict[str, float]:
        """The server's parts of the last call that moved this run (e.g. ``fork_copy``, ``execute``),
        in ms: they come with every reply, so they stay readable after the run is closed."""
        return dict(self._s.timings_ms)

    @property
    def summary(self) -> dict[str, Any]:
        """Everything about the run, as plain values (see ``djinn_nb.wire.messages.RunSummary``); asked
        for again only if the run changed since it was last read."""
        return self._details().to_json()

    @property
    def details(self) -> RunSummary:
        """``summary`` as the typed record it was read into (checked once, when it arrived)."""
        return self._details()

    # ----- tensors ----------------------------------------------------------------
    def activation(self, original: bool = False) -> torch.Tensor:
        """The paused activation on this machine's CPU: (batch, positions, hidden), or at ``z``
        (batch, positions, heads, head_dim). ``original=True``: the site's own value, before any ``edit``."""
        return self._client._tensor_out("activation", self.id, bool(original))

    def logits(self, step: int | None = None) -> torch.Tensor:
        """Next-token logits (vocab,) of the last finished step, or of ``step`` if recorded."""
        return self._client._tensor_out("logits", self.id, step)

    def lens(self, k: int = 5) -> "LensRows":
        """The logit lens at a residual-stream pause (resid_pre, resid_mid, resid_post): for each
        position, the top-``k`` ``(token_id, probability)`` of ``softmax(head(final_norm(activation)))``,
        computed on the server (edits applied). A list of lists; shown with 4 significant digits,
        the values themselves are exact."""
        raw = self._client._call("lens", self.id, k)  # the server's own errors pass as they are
        try:
            reply = LensReply.from_json(raw)
        except BadRequestError as e:
            raise ProtocolError(f"lens: {e}") from None
        self._client._remember((), None, dict(zip(reply.text_ids, reply.texts)))  # the table's next read
        return LensRows([(i, float(p)) for i, p in zip(ids, probs)] for ids, probs in zip(reply.ids, reply.probs))

    def features(self, sae: Any, k: int | None = 10, ids: Sequence[int] | None = None) -> FeatureRows:
        """At a pause at the SAE's layer and site: per position, the ``k`` most active features
        ``(feature, activation)``, most active first, or with ``ids=[...]`` those features'
        activations (``k`` ignored). Computed on the server from the paused activation (edits
        applied), exactly as SAELens's ``encode``."""
        return self._client._saes.features(self.id, sae, k, ids)

    def attention(self) -> torch.Tensor:
        """Block ``layer``'s attention probabilities at the paused step, (batch, heads, queries, keys):
        what ``attn_implementation="eager"`` with ``output_attentions=True`` gives, whatever the server uses."""
        return self._client._tensor_out("attention", self.id)

    # ----- control ----------------------------------------------------------------
    def resume(
        self,
        activation: torch.Tensor | None = None,
        scale: float | None = None,
        add: Any = None,
        original: bool = False,
        heads: Sequence[int] | None = None,
        patch_from: "Run | str | None" = None,
        positions: int | Sequence[int] | None = None,
        clamp: dict[int, float] | None = None, sae: Any = None,
    ) -> "Run":
        """Continue to the next breakpoint or the end, after replacing/scaling/adding to the activation.

        The edit applies to the pending activation (see :meth:`edit`); ``original=True``
        starts from the site's own value instead. At site ``z``, ``heads=[...]`` restricts
        ``scale``/``add`` to those attention heads. ``patch_from=other`` (paused at the same layer, step and
        site) writes its activation at ``positions`` (all if ``None``); ``clamp=, sae=``: see :meth:`fork`.
        """
        if (activation is None and scale is None and add is None and not original and heads is None
                and patch_from is None and positions is None and clamp is None and sae is None):
            return self._update(self._client._call("resume", self.id, self._since()))
        req, act, add_b = edit_request(self._client, activation, scale, add, original, heads, patch_from, positions,
                                       clamp, sae)
        return self._update(self._client._call("resume", self.id, self._since(), wire.dumps(req.to_json()), act,
                                               add_b))

    def fork(
        self,
        activation: torch.Tensor | None = None,
        scale: float | None = None,
        add: Any = None,
        breakpoints: Iterable[Any] | None = None,
        max_new_tokens: int | None = None,
        original: bool = False,
        heads: Sequence[int] | None = None,
        patch_from: "Run | str | None" = None,
        positions: int | Sequence[int] | None = None,
        close: bool = False,
        clamp: dict[int, float] | None = None, sae: Any = None,
    ) -> "Run":
        """A new run continued from this checkpoint with the edit; this run stays paused as it was.

        ``breakpoints=None`` keeps this run's breakpoints; ``[]`` runs the fork to its end.
        ``max_new_tokens`` changes how long the fork generates (it must exceed the paused step).
        ``original=True`` starts from the site's own value, ignoring earlier :meth:`edit` calls.
        ``heads=[3], scale=0.0`` at site ``z`` ablates head 3. ``patch_from=other, positions=[3]``
        writes ``other``'s activation (paused at the same layer, step and site) at position 3.
        ``close=True`` closes the fork on the server as soon as it stops (with ``breakpoints=[]``,
        at its end): it keeps nothing there, and its ``token_ids``, ``text`` and ``history()``
        come with this call's reply. ``clamp={4123: 0.0}, sae=s``: SAE feature 4123 set to 0, error term kept.
        """
        req, act, add_b = fork_request(self._client, dict(
            activation=activation, scale=scale, add=add, breakpoints=breakpoints, max_new_tokens=max_new_tokens,
            original=original, heads=heads, patch_from=patch_from, positions=positions, close=close, clamp=clamp, sae=sae))
        reply = self._client._call("fork", self.id, wire.dumps(req.to_json()), act, add_b, self._since())
        return Run._from_brief(self._client, reply, self)

    def fork_many(self, edits: Sequence[dict[str, Any]], probs_of: int | Sequence[int] | None = None) -> list["Run"]:
        """One new run per dict of :meth:`fork`'s keyword arguments, all from this checkpoint.

        The forks run the remaining layers, and the steps after, as one batch on the server
        (each with its own KV cache and its own end); this run stays paused as it was.
        E.g. ``run.fork_many([{"scale": s, "breakpoints": []} for s in (0.5, 1.0, 2.0)])``.
        ``probs_of`` (a token id or a list; also per dict): each fork's probability of those tokens
        at its last finished step comes in the same reply, as ``fork.probs_of[token]`` — a sweep in
        one round trip, forks closed or not (``"close": True``).
        """
        if isinstance(edits, dict) or not isinstance(edits, (list, tuple)) or not edits:
            raise BadRequestError("fork_many takes a non-empty list of dicts of fork()'s keyword arguments")
        reqs, payloads = [], []
        for i, kw in enumerate(edits):
            if not isinstance(kw, dict):
                raise BadRequestError(f"fork_many: edit {i} must be a dict of fork()'s keyword arguments")
            unknown = sorted(set(kw) - FORK_ARGS)
            if unknown:
                raise BadRequestError(f"fork_many: edit {i} has unknown argument(s) {unknown}; known: {sorted(FORK_ARGS)}")
            req, act, add_b = fork_request(self._client, kw if probs_of is None or "probs_of" in kw
                                           else {**kw, "probs_of": probs_of})
            reqs.append(req.to_json())
            payloads += [act, add_b]
        if all(p is None for p in payloads):
            payloads = []
        reply = self._client._call("fork_many", self.id, wire.dumps(reqs), tuple(payloads), self._since())
        if type(reply) is not list or len(reply) != len(edits):
            raise ProtocolError(f"fork_many: the server answered {len(reply) if type(reply) is list else reply!r} "
                                f"runs for {len(edits)} edits"[:200])
        forks = [Run._from_brief(self._client, r, self) for r in reply]
        for fork, req_json in zip(forks, reqs):
            fork.probs_of = dict(zip(req_json.get("probs_of") or (), fork._probs or ()))
        return forks

    def edit(self, activation: torch.Tensor | None = None, scale: float | None = None, add: Any = None,
             heads: Sequence[int] | None = None, patch_from: "Run | str | None" = None,
             positions: int | Sequence[int] | None = None) -> "Run":
        """Change the paused activation on the server; later resume/fork start from it."""
        req, act, add_b = edit_request(self._client, activation, scale, add, False, heads, patch_from, positions)
        return self._update(self._client._call("edit", self.id, wire.dumps(req.to_json()), act, add_b, self._since()))

    def next_layer(self) -> "Run":
        """Pause at the next block's output in the same step, whatever the breakpoints (they apply
        afterwards); returns this run, as :meth:`resume` does."""
        return self._update(self._client._call("next_layer", self.id, self._since()))

    def next_step(self) -> "Run":
        """Pause at the same layer and site one step later (or run to the end if there is none)."""
        return self._update(self._client._call("next_step", self.id, self._since()))

    def step_through(self, steps: int, **edit: Any) -> "Run":
        """Apply ``edit`` (``resume``'s keywords; none: no edit) at this pause and go on to the same layer
        and site of the next step, ``steps`` times, on the server in one call (no round trip per step)."""
        req, act, add_b = edit_request(self._client, edit.pop("activation", None), edit.pop("scale", None),
                                       edit.pop("add", None), **edit) if edit else (None, None, None)
        return self._update(self._client._call("step_through", self.id, steps, self._since(),
                                               None if req is None else wire.dumps(req.to_json()), act, add_b))

    def rewind(self, step: int, layer: int | None = None, site: str | None = None) -> "Run":
        """A new run paused at (``layer``, ``site``) of an earlier ``step`` of this run, paused or
        finished; this run is left as it is. Defaults: where this run is (or last was) paused.
        The new run reuses this run's KV cache up to that step; only that step is computed again."""
        return Run._from_brief(self._client, self._client._call("rewind", self.id, step, layer, site, self._since()),
                               self)

    def history(self) -> list[dict[str, Any]]:
        """One dict per generated token: ``step``, ``token_id``, ``token`` (text, with a tokenizer),
        ``topk`` (``[(id, prob), ...]``, the chosen token first under greedy), ``entropy`` (nats),
        ``time_s`` (when it was picked, in seconds after this run's first timed token; None for the
        tokens a fork or rewind took over from its source), and with a tokenizer ``topk_tokens``.
        One call, texts included; none for a fork made with ``close=True`` (its reply carried it)."""
        cached = self._history
        records = cached[1] if cached is not None and cached[0] == self._v else self._client._call("history", self.id)
        try:
            out = history_records(records)  # checked field by field (djinn_nb.wire.messages.HistoryRecord)
        except BadRequestError as e:
            raise ProtocolError(f"history: {e}") from None
        _take_texts(self._client, records)
        return out

    def reset(self) -> "Run":
        """Undo edits: the paused activation is the site's own value again."""
        return self._update(self._client._call("reset_edit", self.id, self._since()))

    def offload(self) -> "Run":
        """Move this paused run's KV cache and checkpoint to the server's host memory.

        The next resume/fork/edit/activation brings it back to the device transparently.
        """
        return self._update(self._client._call("offload", self.id, self._since()))

    def watched(self) -> list[dict[str, Any]]:
        """Every watch hit so far: index, layer, site, step, shape, norm/mean/max (overall and per position)."""
        hits = self._client._call("watched", self.id)
        if type(hits) is not list:
            raise ProtocolError(f"watched: expected a list of watch hits, got {type(hits).__name__}")
        try:
            return [WatchHit.from_json(h).to_json() for h in hits]
        except BadRequestError as e:  # the server's reply, not this caller's request, is at fault
            raise ProtocolError(f"watched: {e}") from None

    def watched_activation(self, index: int) -> torch.Tensor:
        """The value recorded by watch hit ``index`` (see :meth:`watched`)."""
        return self._client._tensor_out("watched_activation", self.id, index)

    def refresh(self) -> "Run":
        """Ask the server where the run is now (another handle or client may have moved it)."""
        return self._update(self._client._call("status", self.id, self._since()))

    def run_to_end(self) -> "Run":
        """Resume unmodified until the run is done (a convenience for scripts)."""
        while self.paused:
            self.resume()
        return self

    def close(self) -> None:
        """Free the run's server memory now."""
        if self.state != RunState.CLOSED:
            read_reply("close", ClosedReply, self._client._call("close", self.id))
            self._s.state = RunState.CLOSED

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.close()
        except DjinnError:
            pass

    def __repr__(self) -> str:
        where = f" at layer {self.layer} {self.site} step {self.step}" if self.paused else ""
        return f"<djinn Run {self.id} {self.state}{where}, {len(self._s.token_ids)} tokens>"
