"""Find the parts of a HuggingFace causal LM that breakpoints need.

A breakpoint stops the model's own forward at a site of decoder block ``N``;
continuing means finishing block ``N`` and calling blocks ``N+1..L-1`` by hand
with the arguments the model gave block ``N``, then the final norm and the LM
head. This module finds those parts by name (HF models are consistent within an
architecture family; the sites inside a block are in :mod:`sites`) and
:func:`check_split_is_exact` proves, on the loaded model, that the hand-run
tail gives bit-for-bit the logits of the model's own forward. A model whose
tail does something we do not replay (logit soft-capping, say) fails that check
at load time instead of giving silently different tokens later.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import UnsupportedModelError

BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi3, SmolLM
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
)
NORM_PATHS = (
    "model.norm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
    "model.decoder.final_layer_norm",
    "transformer.norm_f",
    "model.final_layernorm",
)
CACHE_ARGS = ("cache", "past_key_values")


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


@dataclass(frozen=True)
class Anatomy:
    """The modules and calling conventions of one loaded model."""

    blocks: nn.ModuleList
    block_path: str
    final_norm: nn.Module | None
    lm_head: nn.Module
    cache_arg: str
    logits_to_keep: bool

    @property
    def num_layers(self) -> int:
        return len(self.blocks)


def find_anatomy(model: nn.Module) -> Anatomy:
    """Locate decoder blocks, final norm and LM head, or raise naming what was looked for."""
    name = type(model).__name__
    blocks, block_path = None, ""
    for path in BLOCK_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            blocks, block_path = found, path
            break
    if blocks is None:
        raise UnsupportedModelError(
            f"{name}: could not find the decoder blocks; looked for an nn.ModuleList at "
            + ", ".join(BLOCK_PATHS)
        )
    norm = next((m for m in (_get_path(model, p) for p in NORM_PATHS) if m is not None), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise UnsupportedModelError(f"{name}: get_output_embeddings() returned no LM head")
    params = inspect.signature(model.forward).parameters
    cache_arg = next((a for a in CACHE_ARGS if a in params), None)
    if cache_arg is None:
        raise UnsupportedModelError(
            f"{name}.forward takes none of {CACHE_ARGS}: no KV cache to keep between steps"
        )
    return Anatomy(blocks, block_path, norm, head, cache_arg, "logits_to_keep" in params)


def run_tail(anatomy: Anatomy, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head on the last position: next-token logits, shape (batch, vocab)."""
    if anatomy.final_norm is not None:
        hidden = anatomy.final_norm(hidden)
    return anatomy.lm_head(hidden[:, -1:, :])[:, -1, :]


def check_split_is_exact(
    model: nn.Module, anatomy: Anatomy, forward_split: Callable[..., torch.Tensor], sites: Sequence[str]
) -> dict[str, str]:
    """Compare split execution with the model's own forward on a short input, bit for bit.

    ``forward_split(ids, cache, layer, site)`` must stop the model at ``site`` of block
    ``layer`` and finish by hand, returning next-token logits. Two steps are checked
    (the prompt pass and one decoding step), so KV-cache handling is covered too.
    ``resid_post`` (the block's output) must be exact or the model is refused; any other
    site that is not comes back as ``{site: why}`` (breakpoints there are then refused).
    """
    from transformers import DynamicCache

    vocab = int(getattr(model.config, "vocab_size", 2))
    device = anatomy.lm_head.weight.device
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (1, 6), generator=gen).to(device)
    nxt = torch.randint(0, vocab, (1, 1), generator=gen).to(device)
    layer = max(0, anatomy.num_layers // 2 - 1)
    kw = {"use_cache": True}
    if anatomy.logits_to_keep:
        kw["logits_to_keep"] = 1
    inexact: dict[str, str] = {}
    with torch.inference_mode():
        ref_cache = DynamicCache(config=model.config)
        refs = [model(input_ids=ids, **{anatomy.cache_arg: ref_cache}, **kw).logits[:, -1, :]]
        refs.append(model(input_ids=nxt, **{anatomy.cache_arg: ref_cache}, **kw).logits[:, -1, :])
        for site in sites:
            cache = DynamicCache(config=model.config)
            got = [forward_split(ids, cache, layer, site), forward_split(nxt, cache, layer, site)]
            for step, (r, g) in enumerate(zip(refs, got)):
                if not torch.equal(r, g):
                    diff = (r.float() - g.float()).abs().max().item()
                    inexact[site] = (
                        f"{type(model).__name__}: finishing the forward by hand from {site} of block {layer} "
                        f"does not reproduce the model's own forward (step {step}, max abs diff {diff:.3g})"
                    )
                    break
    if "resid_post" in inexact:
        raise UnsupportedModelError(inexact["resid_post"] + "; breakpoints would not be exact on this architecture")
    return inexact
