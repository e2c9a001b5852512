"""Sites inside a decoder block, with TransformerLens' names, and where each lives per architecture.

A block computes, in forward order::

    resid_pre ─► attention (per-head z ─► output projection) ─► attn_out
    resid_mid = resid_pre + attn_out  ─► norm ─► MLP ─► mlp_out
    resid_post = resid_mid + mlp_out

(a parallel-residual block, GPT-NeoX's ``use_parallel_residual``, feeds the MLP
from ``resid_pre`` and has no ``resid_mid``). ``resid_pre`` and ``resid_post``
exist on any model; the sites inside need the block's sub-modules, which
:data:`FAMILIES` names per ``config.model_type`` — the one place to add an
architecture. Each site is reached with a :class:`~djinn_nb.core.pause.Trace`
on a module (:meth:`BlockParts.point`), and :func:`finish_block` runs the rest
of the block by hand from any site, exactly as the block's own forward does
(the load-time probe checks that, bit for bit, per site).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import BreakpointError

SITES = ("resid_pre", "z", "attn_out", "resid_mid", "mlp_out", "resid_post")
DEFAULT_SITE = "resid_post"
RESIDUAL_SITES = frozenset({"resid_pre", "resid_mid", "resid_post"})
ORDER = {s: i for i, s in enumerate(SITES)}


@dataclass(frozen=True)
class Family:
    """Attribute paths of a block's sub-modules (relative to the block)."""

    attn: str
    o_proj: str
    mlp: str
    ln1: str  # the norm in front of the attention
    ln2: str  # the norm in front of the MLP; its input is resid_mid


_GPT2 = Family("attn", "attn.c_proj", "mlp", "ln_1", "ln_2")
_LLAMA = Family("self_attn", "self_attn.o_proj", "mlp", "input_layernorm", "post_attention_layernorm")
_NEOX = Family("attention", "attention.dense", "mlp", "input_layernorm", "post_attention_layernorm")
FAMILIES: dict[str, Family] = {
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "smollm3": _LLAMA,
    "gpt_neox": _NEOX,
}


def check_site(site: object) -> str:
    if not isinstance(site, str) or site not in ORDER:
        raise BreakpointError(f"unknown site {site!r}; a block's sites are {', '.join(SITES)}"[:300])
    return site


def _sub(block: nn.Module, path: str) -> nn.Module | None:
    obj: object = block
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, nn.Module) else None


@dataclass(frozen=True)
class BlockParts:
    """One block and, where its family is known, the sub-modules its inner sites need."""

    layer: int
    block: nn.Module
    model_type: str
    attn: nn.Module | None = None
    o_proj: nn.Module | None = None
    mlp: nn.Module | None = None
    ln1: nn.Module | None = None
    ln2: nn.Module | None = None
    parallel: bool = False
    num_heads: int = 0

    def missing(self, site: str) -> str | None:
        """Why ``site`` cannot be reached in this block, or ``None`` if it can."""
        if site in ("resid_pre", "resid_post"):
            return None
        if self.attn is None:
            known = ", ".join(sorted(FAMILIES))
            return (f"site {site!r} needs the block's sub-layers, which djinn_nb knows for {known}; "
                    f"model type {self.model_type!r} has only resid_pre and resid_post")
        if site == "resid_mid" and self.parallel:
            return (f"{self.model_type} block {self.layer} adds attention and MLP to the residual in "
                    "parallel (use_parallel_residual): it has no resid_mid")
        return None

    def point(self, site: str) -> tuple[nn.Module, bool]:
        """The module and side (``pre``: its input) where ``site``'s value can be seen."""
        module, pre = {
            "resid_pre": (self.block, True),
            "z": (self.o_proj, True),
            "attn_out": (self.attn, False),
            "resid_mid": (self.ln2, True),
            "mlp_out": (self.mlp, False),
            "resid_post": (self.block, False),
        }[site]
        if module is None:
            raise BreakpointError(self.missing(site) or f"block {self.layer} has no module for {site!r}")
        return module, pre

    def as_site(self, site: str, value: torch.Tensor) -> torch.Tensor:
        """The value seen at the site's module, in the site's shape (z: split into heads)."""
        if site == "z":
            return value.unflatten(-1, (self.num_heads, value.shape[-1] // self.num_heads))
        return value

    def needs(self, site: str) -> tuple[str, ...]:
        """Earlier sites :func:`finish_block` reads when it starts from ``site``. (A checkpoint
        keeps ``resid_pre`` too, whatever its site: the attention pattern starts there.)"""
        if site in ("z", "attn_out"):
            return ("resid_pre",)
        if site == "mlp_out":
            return ("resid_pre", "attn_out") if self.parallel else ("resid_mid",)
        return ()


def block_parts(model: nn.Module, blocks: nn.ModuleList, layer: int) -> BlockParts:
    cfg = model.config
    model_type = str(getattr(cfg, "model_type", type(model).__name__))
    block = blocks[layer]
    family = FAMILIES.get(model_type)
    if family is None:
        return BlockParts(layer, block, model_type)
    mods = {name: _sub(block, getattr(family, name)) for name in ("attn", "o_proj", "mlp", "ln1", "ln2")}
    if any(m is None for m in mods.values()):
        return BlockParts(layer, block, model_type)
    heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0))
    parallel = bool(getattr(block, "use_parallel_residual", False))
    return BlockParts(layer, block, model_type, parallel=parallel, num_heads=heads, **mods)


#: ``after(site, value, saved)``: called at each later site :func:`finish_block` reaches
#: (to record a watch, or to pause by raising); ``saved`` holds the earlier sites' values.
AfterSite = Callable[[str, torch.Tensor, dict], None]


def finish_block(
    parts: BlockParts,
    site: str,
    value: torch.Tensor,
    saved: dict[str, torch.Tensor],
    call_block: Callable[[torch.Tensor], torch.Tensor],
    after: AfterSite,
) -> torch.Tensor:
    """Block ``parts.layer`` from ``site`` (whose value is ``value``) to ``resid_post``.

    Nothing before ``site`` runs again. ``call_block(resid_pre)`` runs the whole block
    (from ``resid_pre`` there is nothing to skip); the other sites replay the block's
    own arithmetic, in its order, so that the result is bit for bit the block's.
    """
    if site == "resid_pre":
        return call_block(value)
    if site == "resid_post":
        return value
    o_proj, mlp, ln2 = parts.o_proj, parts.mlp, parts.ln2
    if o_proj is None or mlp is None or ln2 is None:  # no inner sites in this block: only resid_pre/post
        raise BreakpointError(parts.missing(site) or f"block {parts.layer} has no site {site!r}")
    saved = dict(saved)
    h = value
    if site == "z":
        h = o_proj(h.flatten(-2))  # GPT-2's resid_dropout / NeoX's dropout: identity in eval
        saved["attn_out"] = h
        after("attn_out", h, saved)
        site = "attn_out"
    if site == "attn_out":
        saved["attn_out"] = h
        if parts.parallel:
            m = mlp(ln2(saved["resid_pre"]))
            after("mlp_out", m, saved)
            return m + h + saved["resid_pre"]
        h = h + saved["resid_pre"]
        saved["resid_mid"] = h
        after("resid_mid", h, saved)
        site = "resid_mid"
    if site == "resid_mid":
        saved["resid_mid"] = h
        m = mlp(ln2(h))
        after("mlp_out", m, saved)
        return h + m
    # mlp_out
    if parts.parallel:
        return h + saved["attn_out"] + saved["resid_pre"]
    return saved["resid_mid"] + h
