"""Token ids as text: the decoding calls, and the texts that replies carry.

Why a module of its own: over a real network every round trip is the link's latency, so a
notebook must never decode one token per call. ``decode_many`` decodes any number of
sequences and single tokens in one call, and replies carry the text the caller reads next:
a fork's (or rewind's) brief and a finished run's carry the run's text, ``generate`` and
``summary`` the text the run card shows, a closed fork its history with the tokens' texts,
the lens the text of every token it names. A paused run's step brief carries none: pausing
at every step must not decode the whole sequence at every step.

A class given the caller (a :class:`~djinn_nb.serving.parts.Caller`: its name and the engine);
it is the other call groups' :class:`~djinn_nb.serving.parts.Replies`.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterable

from ..core.runs import Run
from ..errors import BadRequestError, DjinnError
from ..states import RunState
from ..wire.calls import DecodeManyReply, DecodeManyRequest
from .. import wire
from . import run_views
from .parts import Caller

if TYPE_CHECKING:  # pragma: no cover
    from ..core.engine import Engine
    from ..core.navigation import TokenRecord

__all__ = ["TextCalls"]

_PAUSED = RunState.PAUSED  # read once: an enum member's lookup is on every brief's path

#: The most token ids one ``decode_many`` call decodes, over all its sequences and tokens.
MAX_DECODE_IDS = 1 << 20


def _ids(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or any(type(i) is not int for i in value):
        raise BadRequestError(f"{what} must be a list of ints")
    return value


class TextCalls:
    """``tokenize``, ``decode``, ``decode_each``, ``decode_many``; briefs and summaries with their text
    (implements :class:`~djinn_nb.serving.parts.Replies`)."""

    def __init__(self, caller: Caller):
        self._caller = caller

    @property
    def _engine(self) -> Engine:
        return self._caller.engine

    # ----- what replies carry -----------------------------------------------------
    def _text(self, ids: list[int]) -> str | None:
        """The text of ``ids``, or None for a model without a tokenizer."""
        return self._engine.decode(ids) if self._engine.tokenizer is not None else None

    def token_texts(self, ids: Iterable[int]) -> dict[int, str]:
        """Each distinct id's own text (none without a tokenizer)."""
        if self._engine.tokenizer is None:
            return {}
        unique = list(dict.fromkeys(ids))
        return dict(zip(unique, self._engine.decode_each(unique)))

    def brief(self, run: Run, since: int | None, new: bool = False) -> dict[str, Any]:
        """The run's ``RunBrief``: with its text for a new run (fork, rewind) or one no longer
        paused (what the caller reads next), without at a pause (a step's brief stays small)."""
        text = self._text(run.token_ids) if new or run.state is not _PAUSED else None
        return run_views.brief(run, since, text).to_json()

    def closed_brief(self, run: Run, since: int | None) -> dict[str, Any]:
        """A fork asked to close at once (``ForkRequest.close``): everything a caller can read of
        it, its text and its history with their texts, then the run closed on the server."""
        brief = run_views.brief(run, since, self._text(run.token_ids))
        brief.history = self.history(self._engine.history(run.id, run.owner))
        with contextlib.suppress(DjinnError):  # already gone (its lease ended): nothing to free
            self._engine.close(run.id, run.owner)
        self._caller.state.freed.set()
        brief.state = RunState.CLOSED
        return brief.to_json()

    def summary(self, run: Run) -> dict[str, Any]:
        """The run's ``RunSummary`` with its text (what the run card shows)."""
        return run_views.summary(run, self._text(run.token_ids)).to_json()

    def history(self, records: list[TokenRecord]) -> list[dict[str, Any]]:
        """``run.history()``'s records (``HistoryRecord``), with ``token`` and ``topk_tokens`` texts
        (with a tokenizer)."""
        texts = self.token_texts(i for r in records for i in (r.token_id, *(t for t, _ in r.topk)))
        return [r.to_json() for r in run_views.history(records, texts)]

    # ----- calls (the service's exposed_<name>) -------------------------------------
    def tokenize(self, text: Any) -> list[int]:
        self._caller.who()
        if type(text) is not str:
            raise BadRequestError("text must be a string")
        return self._engine.encode(text)

    def decode(self, ids_json: Any) -> str:
        self._caller.who()
        return self._engine.decode(_ids(wire.loads(ids_json, "token ids"), "token ids"))

    def decode_each(self, ids_json: Any) -> list[str]:
        """The text of each token id on its own."""
        self._caller.who()
        ids = _ids(wire.loads(ids_json, "token ids"), "token ids")
        if len(ids) > 1 << 16:
            raise BadRequestError("token ids must be a list of at most 65536 ints")
        return self._engine.decode_each(ids)

    def decode_many(self, request_json: Any) -> dict[str, list[str]]:
        """``{"sequences": [[ids], ...], "tokens": [ids]}``: the text of each sequence and of each
        token on its own, in one call (at most ``MAX_DECODE_IDS`` ids in all)."""
        self._caller.who()
        req = DecodeManyRequest.from_json(wire.loads(request_json, "decode_many request"))
        seqs = [_ids(s, "each sequence") for s in req.sequences]
        tokens = _ids(req.tokens, "tokens")
        if sum(map(len, seqs)) + len(tokens) > MAX_DECODE_IDS:
            raise BadRequestError(f"decode_many decodes at most {MAX_DECODE_IDS} token ids at once")
        return DecodeManyReply([self._engine.decode(s) for s in seqs], self._engine.decode_each(tokens)).to_json()
