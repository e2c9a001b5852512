"""What a client is told of a run, built from a core run: its brief, listing row, summary, history.

Why here: core keeps a run's state (:mod:`djinn_nb.core.runs`) and knows nothing of the wire; the
wire's vocabulary (:mod:`djinn_nb.wire.messages`) knows nothing of torch. Serving reads a core
run's fields and builds the typed messages (:class:`RunBrief`, :class:`RunRow`,
:class:`RunSummary`, :class:`HistoryRecord`); the callers turn them to JSON where the wire needs it
(``to_json``, the same keys the wire always carried). Texts are the caller's to decode
(:mod:`.text_calls`): these functions take them as given.

A brief is on every step's and every fork's path (``fork_many`` builds 16–64 per call), so it is
one dataclass built positionally and one dict (``RunBrief.to_json``), no field walk.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..wire.messages import HistoryRecord, RunBrief, RunRow, RunSummary

if TYPE_CHECKING:  # pragma: no cover
    from ..core.navigation import TokenRecord
    from ..core.runs import Run

__all__ = ["brief", "history", "row", "summary", "timings_ms"]


def timings_ms(run: Run) -> dict[str, float]:
    """The server's parts of the last call on ``run``, in milliseconds (what briefs and summaries carry)."""
    return {k: round(v * 1e3, 4) for k, v in run.timings.items()}


def brief(run: Run, since: int | None, text: str | None = None) -> RunBrief:
    """Where the run is, in a few fields: what most calls answer. ``since``: how many of the run's
    (or, for a new run, its source's) token ids the client already has; only the ids after
    ``keep`` are sent (a run's tokens only grow, and a fork's or rewind's start with its
    source's). ``v`` tells the client whether the details it holds are stale."""
    tokens = run.trajectory.token_ids
    keep = 0 if since is None else min(since, len(tokens))
    cp = run.checkpoint
    if cp is None:
        step, layer, site = run.step, None, None
    else:
        step, layer, site = cp.step, cp.layer, cp.site
    timings = {k: round(v * 1e3, 4) for k, v in run.timings.items()}  # timings_ms(run), without the call
    return RunBrief(run.id, run.state, step, layer, site, keep, tokens[keep:], run.max_new_tokens, run.parent,
                    run.host_pack is not None, run.error, run.lock.version, timings, text)


def row(run: Run) -> RunRow:
    """The run's line in a listing, without its tokens."""
    cp = run.checkpoint
    return RunRow(id=run.id, state=run.state, layer=cp.layer if cp else None, site=cp.site if cp else None,
                  step=cp.step if cp else run.step, tokens=len(run.token_ids), bytes_held=run.bytes_held(),
                  offloaded=run.offloaded, parent=run.parent, idle_s=round(time.monotonic() - run.last_used, 3))


def summary(run: Run, text: str | None = None, detail: bool = True) -> RunSummary:
    """What a client sees of the run; ``detail`` adds the paused activation's statistics
    (a device read, once per pending tensor) and the top-k."""
    version = run.lock.version  # read first: a change while this is built leaves it stale, not wrong
    cp = run.checkpoint
    activation: dict[str, Any] | None = None
    if detail and cp is not None:
        stats = run.pending_stats()
        assert stats is not None
        activation = {"shape": list(cp.pending.shape), "dtype": str(cp.pending.dtype).replace("torch.", ""),
                      "edited": cp.edited, **stats}
    return RunSummary(
        id=run.id,
        state=run.state,
        step=cp.step if cp else run.step,
        layer=run.layer,
        site=run.site,
        token_ids=list(run.token_ids),
        prompt_ids=list(run.prompt_ids),
        max_new_tokens=run.max_new_tokens,
        breakpoints=[b.as_dict() for b in run.breakpoints],
        watches=[b.as_dict() for b in run.watches],
        watched=len(run.watch_log),
        bytes_held=run.bytes_held(),
        offloaded=run.offloaded,
        parent=run.parent,
        error=run.error,
        held=run.held,
        timings_ms=timings_ms(run),
        continued_by=run.continued_by,
        topk=[list(x) for x in run.topk[-1]] if detail and run.topk else None,
        activation=activation,
        idle_s=round(time.monotonic() - run.last_used, 3),
        v=version,
        text=text,
    )


def history(records: list[TokenRecord], texts: dict[int, str]) -> list[HistoryRecord]:
    """Core's per-token records as ``run.history()``'s, with ``token`` and ``topk_tokens`` texts
    where ``texts`` (each id's own text) has them (with a tokenizer)."""
    if not texts:
        return [HistoryRecord(r.step, r.token_id, r.topk, r.entropy, r.time_s) for r in records]
    return [HistoryRecord(r.step, r.token_id, r.topk, r.entropy, r.time_s, texts[r.token_id],
                          [texts[t] for t, _ in r.topk]) for r in records]
