"""What a pause shows beyond the activation: the logit lens and the attention pattern.

Both are computed on the server from what the checkpoint already holds, and
change nothing: the lens applies the model's own final norm and head to a
residual-stream value; the attention pattern re-runs block N's attention module
on its own input against a copy of the KV cache cropped to before this step, with
the model's *eager* attention function standing in for whichever implementation
it was loaded with (so it is the pattern ``attn_implementation="eager"`` and
``output_attentions=True`` would give: causal mask, rotary embeddings,
grouped-query heads and sliding windows as the architecture has them).
"""
from __future__ import annotations

import copy
import inspect
import sys
from typing import Any, Callable

import torch

from ..errors import BadRequestError, UnsupportedModelError
from . import kvcache
from .architecture import Anatomy
from .runs import Checkpoint, Run
from transformers.cache_utils import CacheLayerMixin
from .sites import RESIDUAL_SITES, BlockParts


def lens_logits(anatomy: Anatomy, h: torch.Tensor) -> torch.Tensor:
    """``lm_head(final_norm(h))`` at every position: (..., positions, vocab)."""
    if anatomy.final_norm is not None:
        h = anatomy.final_norm(h)
    return anatomy.lm_head(h)


def lens_topk(anatomy: Anatomy, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the top-``k`` (ids, probabilities) of ``softmax(lm_head(final_norm(h)))``."""
    probs = torch.softmax(lens_logits(anatomy, h).float(), dim=-1)
    vals, idx = torch.topk(probs, k, dim=-1)
    return idx, vals


#: The most bytes of logits the lens grid computes at once. All layers x positions x vocabulary in
#: one go was ~5 GB for GPT-2 at 1,020 positions and would be ~40 GB for a 32-layer, 4,096-position,
#: 32k-vocabulary model; a layer at a time (and a chunk of positions where one layer is too much)
#: keeps only the top-k of each.
LENS_CHUNK_BYTES = 256 << 20


def lens_topk_layers(anatomy: Anatomy, layers: list[torch.Tensor], k: int,
                     between: Callable[[], None] = lambda: None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lens_topk` of each layer's (positions, hidden) value, a layer (or a chunk of
    positions) at a time, calling ``between`` before each (where the device may be handed on):
    (layers, positions, k) ids and probabilities. A layer that fits in ``LENS_CHUNK_BYTES`` is
    computed exactly as ``run.lens`` computes it at a pause there."""
    vocab = int(anatomy.head_weight.shape[0])
    per = max(1, LENS_CHUNK_BYTES // (8 * vocab))  # the float logits and their softmax
    ids, probs = [], []
    for h in layers:
        parts = []
        for i in range(0, h.shape[0], per):
            between()
            parts.append(lens_topk(anatomy, h[i:i + per], k))
        ids.append(torch.cat([p[0] for p in parts]))
        probs.append(torch.cat([p[1] for p in parts]))
    return torch.stack(ids), torch.stack(probs)


def probs_of(run: Run, ids: list[int]) -> list[float] | None:
    """``run``'s probabilities of ``ids`` at its last finished step (None: no finite distribution)."""
    logits = run.last_logits
    if logits is None:
        return None
    with torch.inference_mode():
        p = logits.float().softmax(-1).reshape(-1)[torch.tensor(ids, dtype=torch.long, device=logits.device)]
        return p.tolist() if bool(torch.isfinite(p).all()) else None


def check_lens_site(cp: Checkpoint) -> None:
    if cp.site not in RESIDUAL_SITES:
        raise BadRequestError(
            f"the logit lens reads the residual stream (resid_pre, resid_mid, resid_post); "
            f"this run is paused at {cp.site}"
        )


def _eager_function(attn: torch.nn.Module) -> Callable[..., Any]:
    fn = getattr(sys.modules.get(type(attn).__module__), "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedModelError(f"{type(attn).__name__}: no eager attention function to read the pattern with")
    return fn


def _additive_mask(mask: Any, q_len: int, k_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The mask an eager attention adds: from a boolean (True = attend) or additive mask, or the
    causal mask an SDPA call without one implies."""
    if mask is None:
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)[None, None]
    elif mask.dtype == torch.bool:
        keep = mask
    else:
        return mask
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)


class _RecordPattern:
    """Stands in for the attention function of the model's implementation; records eager weights."""

    def __init__(self, eager: Callable[..., Any]):
        self.eager, self.weights = eager, None

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs.pop("is_causal", None)
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
            attention_mask = attention_mask[..., : key.shape[-2]]
        mask = _additive_mask(attention_mask, query.shape[-2], key.shape[-2], query.dtype, query.device)
        out, weights = self.eager(module, query, key, value, mask, *args, **kwargs)
        self.weights = weights
        return out, weights


def attention_pattern(model: torch.nn.Module, parts: BlockParts, cp: Checkpoint, cache: Any) -> torch.Tensor:
    """Block ``cp.layer``'s attention probabilities at the paused step: (batch, heads, queries, keys), fp32."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if parts.attn is None or parts.ln1 is None:
        raise UnsupportedModelError(parts.missing("attn_out") or "this block's attention module is unknown")
    resid_pre = cp.saved.get("resid_pre")
    if resid_pre is None:
        raise BadRequestError(f"the checkpoint at {cp.where} did not keep its block's input")
    q_len = resid_pre.shape[-2]
    mine = kvcache.fork_cache(cache)
    if cp.site != "resid_pre":  # the step's own keys are in the cache already: drop them, the re-run adds them
        layer = copy.copy(mine.layers[cp.layer])
        if not isinstance(layer, CacheLayerMixin) or layer.keys is None or layer.values is None:
            raise UnsupportedModelError(f"block {cp.layer}'s cache layer ({type(layer).__name__}) keeps no keys and values")
        layer.keys, layer.values = layer.keys[..., :-q_len, :], layer.values[..., :-q_len, :]
        mine.layers[cp.layer] = layer
    signature = inspect.signature(parts.block.forward)
    bound = signature.bind(resid_pre, *cp.args, **cp.kwargs).arguments
    var_kw = [n for n, p in signature.parameters.items() if p.kind == p.VAR_KEYWORD]
    call = {name: value for name, value in bound.items() if name not in ["hidden_states", *var_kw]}
    for name in var_kw:
        call.update(bound.get(name, {}))
    call = {name: (mine if value is cache else value) for name, value in call.items()}
    accepted = inspect.signature(parts.attn.forward).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        call = {k: v for k, v in call.items() if k in accepted}
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    recorder = _RecordPattern(_eager_function(parts.attn))
    had = impl in ALL_ATTENTION_FUNCTIONS._local_mapping
    previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get(impl)
    ALL_ATTENTION_FUNCTIONS[impl] = recorder
    try:
        parts.attn(parts.ln1(resid_pre), **call)
    finally:
        if had:
            ALL_ATTENTION_FUNCTIONS[impl] = previous
        else:
            del ALL_ATTENTION_FUNCTIONS[impl]
    if recorder.weights is None:
        raise UnsupportedModelError(f"{type(parts.attn).__name__} did not call an attention function")
    return recorder.weights.float()
