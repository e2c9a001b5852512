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
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

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

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's weight matrix (vocab, hidden)."""
        return weight_of(self.lm_head)


def weight_of(module: nn.Module) -> torch.Tensor:
    """``module.weight``, which ``nn.Module``'s ``__getattr__`` types as a tensor or a module."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise UnsupportedModelError(f"{type(module).__name__} has no weight tensor")
    return weight


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
    get_head = getattr(model, "get_output_embeddings", None)  # a PreTrainedModel's, on other modules maybe none
    head = get_head() if get_head is not None else None
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


#: ``forward_split(ids, cache, points)``: the model's own forward paused at the first of
#: ``points`` (``(layer, site)`` pairs in forward order), then finished by hand, pausing and
#: continuing at each later point as a run with several breakpoints in one step does;
#: returns the next-token logits.
ForwardSplit = Callable[[torch.Tensor, object, Sequence[tuple[int, str]]], torch.Tensor]

#: The order in which the probe's chain visits sites (filtered to the model's): ``resid_post``
#: (which must be exact) and ``z`` take the first layer, where the model's own forward pauses.
CHAIN_ORDER = ("resid_post", "z", "resid_pre", "attn_out", "resid_mid", "mlp_out")


def probe_chains(num_layers: int, sites: Sequence[str]) -> list[list[tuple[int, str]]] | None:
    """The probe's two chains (prompt pass, decoding step): every site once, each at its own layer,
    spread from the first block to the last; ``None`` when there are fewer blocks than sites.

    The decoding step's chain rotates the sites by one, so each step's forward pauses at a
    different site in the model's own forward and each site is finished at two layers.
    """
    order = [s for s in CHAIN_ORDER if s in sites]
    n = len(order)
    if n == 0 or num_layers < n:
        return None
    layers = [0] if n == 1 else [round(i * (num_layers - 1) / (n - 1)) for i in range(n)]
    return [[(layers[i], order[(i + k) % n]) for i in range(n)] for k in (0, 1)]


def check_split_is_exact(
    model: PreTrainedModel, anatomy: Anatomy, forward_split: ForwardSplit, sites: Sequence[str]
) -> dict[str, str]:
    """Compare split execution with the model's own forward on a short input, bit for bit.

    Two steps are checked (a 6-token prompt pass and one decoding step), so KV-cache handling
    is covered too. Each step's split forward is one chain (:func:`probe_chains`): paused at a
    site of one block in the model's own forward, finished by hand, paused again at the next
    site of a later block and so on to the head, so one forward per step checks finishing from
    every site (4 forwards in all instead of 2 + 2 per site). If a chain's logits differ, each
    site is probed alone at the layers the chains used, to say which sites are inexact.
    ``resid_post`` (the block's output) must be exact or the model is refused; any other site
    that is not comes back as ``{site: why}`` (breakpoints there are then refused).
    """
    vocab = int(getattr(model.config, "vocab_size", 2))
    device = anatomy.head_weight.device
    gen = torch.Generator().manual_seed(1234)
    steps = [torch.randint(0, vocab, (1, 6), generator=gen).to(device),
             torch.randint(0, vocab, (1, 1), generator=gen).to(device)]
    kw: dict[str, bool | int] = {"use_cache": True}
    if anatomy.logits_to_keep:
        kw["logits_to_keep"] = 1
    name = type(model).__name__
    threads = torch.get_num_threads()
    fewer = device.type == "cpu" and threads > 1
    if fewer:
        # 6-token forwards are memory-bound: half the threads lose little on an idle machine, and on a
        # busy one they do not stall at every op's barrier waiting for a descheduled thread (on two
        # cores shared with other work the probe took 8-14 s with 2 threads, 0.6 s with 1).
        # The thread count is the same for both sides of every comparison, so what is compared is
        # the same as at any other count: the same operations on the same inputs.
        torch.set_num_threads(max(1, threads // 2))
    try:
        return _probe(model, anatomy, forward_split, sites, steps, kw, name)
    finally:
        if fewer:
            torch.set_num_threads(threads)


def _probe(model: PreTrainedModel, anatomy: Anatomy, forward_split: ForwardSplit, sites: Sequence[str],
           steps: list[torch.Tensor], kw: dict, name: str) -> dict[str, str]:
    from transformers import DynamicCache

    with torch.inference_mode():
        ref_cache = DynamicCache(config=model.config)
        refs = [model(input_ids=x, **{anatomy.cache_arg: ref_cache}, **kw).logits[:, -1, :] for x in steps]

        def differs(points_per_step: Sequence[Sequence[tuple[int, str]]]) -> str | None:
            cache = DynamicCache(config=model.config)
            for step, (x, points, ref) in enumerate(zip(steps, points_per_step, refs)):
                got = forward_split(x, cache, points)
                if not torch.equal(ref, got):
                    diff = (ref.float() - got.float()).abs().max().item()
                    return f"step {step}, max abs diff {diff:.3g}"
            return None

        chains = probe_chains(anatomy.num_layers, sites)
        if chains is not None and differs(chains) is None:
            return {}
        layer_of = {s: l for l, s in chains[0]} if chains else {}
        inexact: dict[str, str] = {}
        for site in sites:
            layer = layer_of.get(site, max(0, anatomy.num_layers // 2 - 1))
            why = differs([[(layer, site)]] * 2)
            if why is not None:
                inexact[site] = (
                    f"{name}: finishing the forward by hand from {site} of block {layer} "
                    f"does not reproduce the model's own forward ({why})"
                )
    if "resid_post" in inexact:
        raise UnsupportedModelError(inexact["resid_post"] + "; breakpoints would not be exact on this architecture")
    if chains is not None and not inexact:
        raise UnsupportedModelError(
            f"{name}: each site finishes exactly alone, but pausing at several sites of one forward "
            "does not reproduce the model's own forward; breakpoints would not be exact on this architecture"
        )
    return inexact
