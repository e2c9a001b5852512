"""Attribution patching (AtP): a patching grid estimated from two forwards and one backward.

Why: the exact grid costs a batch of forwards per layer, and a per-head grid of a large model
(layers × heads × positions) many more; the field's answer (Nanda's attribution patching, Kramár
et al.'s AtP*) is a first-order estimate of every cell at once — the change in a metric when the
clean activation replaces the corrupted one is about ``(clean − corrupted) · ∂metric/∂activation``,
the gradient taken in the corrupted run — and then to patch exactly only the cells the estimate
ranks highest (``causal_trace(..., cells=...)``). The grid is the exact one's (patchgrid.py):
each cell's estimate is the sum of that product over the cell's hidden units (at ``z``: over the
head's dimensions at every position of the grid).

How, on the server: one forward of the clean and the corrupted prompt as a batch of two rows
records the grid's site at every layer inside an autograd graph (two rows cost about one forward
where a step is memory-bound, as a large model's short prompt is) — the input embeddings'
output made to require a gradient, every parameter's ``requires_grad`` switched off for the call
(no parameter gradient is computed or stored) and restored after, whatever happens — and
``torch.autograd.grad`` of the metric (the corrupted row's) gives the gradients at those tensors alone (nothing
accumulates in ``.grad``). Plain forwards of the model under hooks that only read: no cache, no
run, the weights untouched; the device held for the call, as any step holds it.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..errors import BadRequestError
from .pause import Trace
from .patchgrid import GridSpec

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine

METRICS = ("logit_diff", "prob")


@dataclass
class AttributionGrid:
    """``rows[i][j]``: the estimated change of the metric when cell (layers[i], column j) is patched."""

    rows: list[list[float]]
    metric: str
    clean_metric: float
    corrupt_metric: float
    clean_prob: float
    corrupt_prob: float
    answer: int
    foil: int | None


def check_metric(metric: Any) -> str:
    if not isinstance(metric, str) or metric not in METRICS:
        raise BadRequestError(f"metric must be one of {list(METRICS)}, got {str(metric)[:60]!r}")
    return metric


def _token(value: Any, vocab: int, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise BadRequestError(f"{what} must be a token id in 0..{vocab - 1}, got {value!r}"[:200])
    return value


def attribution_patching(engine: "Engine", clean_ids: Sequence[int], corrupt_ids: Sequence[int], spec: GridSpec,
                         answer: int | None = None, metric: str = "logit_diff", foil: int | None = None) -> AttributionGrid:
    """The AtP estimate of ``spec``'s grid (every cell; see the module's docstring).

    ``metric``: ``"prob"``, p(answer) at the last position (the exact grid's quantity), or
    ``"logit_diff"``, logit(answer) − logit(foil); ``foil`` defaults to the corrupted prompt's
    greedy next token (its second-best when that is the answer)."""
    metric = check_metric(metric)
    if len(clean_ids) != len(corrupt_ids):
        raise BadRequestError(f"the clean and corrupted prompts must have the same number of tokens: "
                              f"{len(clean_ids)} vs {len(corrupt_ids)}")
    vocab = int(getattr(engine.model.config, "vocab_size", 0)) or 1
    answer, foil = _token(answer, vocab, "answer"), _token(foil, vocab, "foil")
    if metric == "prob" and foil is not None:
        raise BadRequestError("foil is the other token of metric='logit_diff'; metric 'prob' takes none")
    for layer in spec.layers:
        engine.check_site(layer, spec.site)
    model = engine.model
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    with engine.device_turn(), torch.inference_mode(False):
        try:
            for p in params:
                p.requires_grad_(False)
            with torch.enable_grad():  # both prompts as one batch of two rows: one forward, not two
                both, logits = _forward(engine, [clean_ids, corrupt_ids], spec, grad=True)
                clean_lp, corrupt_lp = logits[0].detach().float(), logits[1].float()
                if answer is None:
                    answer = int(clean_lp.argmax())
                if metric == "logit_diff" and foil is None:
                    top2 = corrupt_lp.detach().topk(2).indices.tolist()
                    foil = top2[1] if top2[0] == answer else top2[0]
                value = _metric(corrupt_lp, metric, answer, foil)  # of the corrupted row alone
                grads = torch.autograd.grad(value, both)
            heads = engine.parts[0].num_heads
            rows = [_cells(spec, rec[0:1].detach(), rec[1:2].detach(), grad[1:2], heads)
                    for rec, grad in zip(both, grads)]
            return AttributionGrid(rows, metric, float(_metric(clean_lp, metric, answer, foil)), float(value.detach()),
                                   float(clean_lp.softmax(-1)[answer]), float(corrupt_lp.detach().softmax(-1)[answer]),
                                   answer, foil)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)


def _metric(logits: torch.Tensor, metric: str, answer: int, foil: int | None) -> torch.Tensor:
    if metric == "prob":
        return logits.softmax(-1)[answer]
    assert foil is not None
    return logits[answer] - logits[foil]


def _forward(engine: "Engine", rows: Sequence[Sequence[int]], spec: GridSpec,
             grad: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One plain forward of prompts of one length as a batch: the site's value at each of the grid's
    layers (the tensors themselves, in the graph, when ``grad``) and each row's last logits."""
    recorded: dict[int, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        for layer in spec.layers:
            module, pre = engine.parts[layer].point(spec.site)
            stack.enter_context(Trace(module, pre=pre, on_value=functools.partial(recorded.__setitem__, layer)))
        if grad:  # everything after the embeddings is in the graph; nothing before it (no parameter needs a grad)
            handle = engine.model.get_input_embeddings().register_forward_hook(
                lambda _m, _a, out: out.requires_grad_(True))
            stack.callback(handle.remove)
        kw: dict[str, Any] = {"use_cache": False}
        if engine.anatomy.logits_to_keep:
            kw["logits_to_keep"] = 1
        x = torch.tensor([list(ids) for ids in rows], dtype=torch.long, device=engine.device)
        logits = engine.model(input_ids=x, **kw).logits[:, -1]
    return [recorded[layer] for layer in spec.layers], logits


def _cells(spec: GridSpec, clean: torch.Tensor, corrupt: torch.Tensor, grad: torch.Tensor, num_heads: int) -> list[float]:
    """One layer's estimates: (clean − corrupted) · grad, summed over each column's units (at ``z``,
    the flat input of the output projection, over one head's dimensions at every grid position)."""
    prod = (clean.float() - corrupt.float()) * grad.float()  # (1, positions, units)
    if spec.site == "z":
        per_head = prod[0, spec.positions].unflatten(-1, (num_heads, -1)).sum(dim=(0, 2))
        return per_head[spec.heads].tolist()
    return prod[0, spec.positions].sum(-1).tolist()


__all__ = ["METRICS", "AttributionGrid", "attribution_patching", "check_metric"]
