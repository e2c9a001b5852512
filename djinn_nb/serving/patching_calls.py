"""The exposed call that estimates a patching grid: ``attribution_patching`` (core/attribution.py).

A class given the caller (a :class:`~djinn_nb.serving.parts.Caller`) and the texts replies carry
(:class:`~djinn_nb.serving.parts.Replies`), kept apart so each module has one job. The call
makes no run, but a forward kept for a backward holds every layer's activations at once, so it
is admitted on an estimate of those bytes (``backward_bytes``) before anything is computed, as
a call that makes runs is admitted on its KV caches.
"""
from __future__ import annotations

from typing import Any

import torch

from ..core.attribution import attribution_patching, check_metric
from ..core.patchgrid import grid_spec
from ..core.tracing import check_grid
from ..errors import BadRequestError
from ..wire.calls import AttributionReply, AttributionRequest
from .. import wire
from .debug_calls import resolve_answer
from .parts import Caller, Replies

__all__ = ["PatchingCalls", "backward_bytes", "resolve_answer"]

def backward_bytes(config: Any, dtype: torch.dtype, positions: int) -> int:
    """About what one forward kept for a backward holds: per layer and position, a few dozen
    hidden-size and a few intermediate-size vectors, the attention probabilities, and the same
    again for the gradients in flight (fp32 products on top). An estimate to admit on, not a bound."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or 0
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0
    inner = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 0
    vocab = getattr(cfg, "vocab_size", None) or 0
    size = torch.empty((), dtype=dtype).element_size()
    per_layer = positions * (24 * hidden + 6 * inner) + 3 * heads * positions * positions
    return 2 * size * int(layers) * int(per_layer) + 8 * int(vocab)


class PatchingCalls:
    """``attribution_patching``."""

    def __init__(self, caller: Caller, replies: Replies):
        self._caller = caller
        self._replies = replies

    def attribution_patching(self, request_json: Any) -> dict[str, Any]:
        """The AtP estimate of a causal-trace grid: {clean, corrupted (texts or ids), answer (id, text
        of one token, or null), layers, positions (lists or null), site, heads ("all", a list or null:
        site z), metric ("logit_diff" or "prob"), foil (id or null: logit_diff's other token)}. Answers
        the rows (the estimated change of the metric per cell), the metric in both runs, both runs'
        p(answer), the answer, the foil and the clean prompt's ids, with the texts a plot labels."""
        req = AttributionRequest.from_json(wire.loads(request_json, "attribution_patching request"))
        engine = self._caller.engine
        clean, corrupted = engine.encode(req.clean), engine.encode(req.corrupted)
        if len(clean) != len(corrupted):
            raise BadRequestError(f"the clean and corrupted prompts must have the same number of tokens: "
                                  f"{len(clean)} vs {len(corrupted)}")
        engine.check_positions(len(clean), 1)
        answer = resolve_answer(engine, req.answer)
        metric = check_metric(req.metric)
        layers, positions = check_grid(engine.num_layers, len(clean), req.layers, req.positions)
        spec = grid_spec(req.site, layers, positions, req.heads, None, engine.parts[0].num_heads)
        # two rows (clean, corrupted) in one graph
        self._caller.check_quota(1, new_runs=0, adding=2 * backward_bytes(engine.model.config, engine.dtype, len(clean)))
        with self._caller.scope():
            grid = attribution_patching(engine, clean, corrupted, spec, answer, metric, req.foil)
        texts = self._replies.token_texts([grid.answer] + ([grid.foil] if grid.foil is not None else []) + clean)
        return AttributionReply(rows=grid.rows, metric=grid.metric, clean_metric=grid.clean_metric,
                                corrupt_metric=grid.corrupt_metric, clean_prob=grid.clean_prob,
                                corrupt_prob=grid.corrupt_prob, answer=grid.answer, foil=grid.foil, layers=layers,
                                positions=positions, heads=spec.heads, clean_ids=clean, text_ids=list(texts),
                                texts=list(texts.values())).to_json()
