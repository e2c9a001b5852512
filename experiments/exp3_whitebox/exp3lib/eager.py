"""Plain eager PyTorch, no djinn_nb: a greedy loop over the model's own forward with a KV cache,
and the "remaining layers alone" reference (blocks N+1.. + final norm + head from a captured input)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from djinn_nb.architecture import Anatomy, block_output, run_tail
from djinn_nb.kvcache import fork_cache


def _new_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _forward_kwargs(anatomy: Anatomy, cache: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {anatomy.cache_arg: cache, "use_cache": True}
    if anatomy.logits_to_keep:
        kw["logits_to_keep"] = 1
    return kw


def eos_ids(model: nn.Module) -> frozenset[int]:
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return frozenset([eos] if isinstance(eos, int) else (eos or []))


@dataclass
class GreedyResult:
    token_ids: list[int]
    logits: list[torch.Tensor]  # next-token logits of each step, on the CPU


@torch.inference_mode()
def greedy(model: nn.Module, anatomy: Anatomy, prompt: Sequence[int], max_new_tokens: int, keep_logits: bool = False) -> GreedyResult:
    """Greedy generation with the model's own forward; stops at EOS like the engine does."""
    device = model.get_input_embeddings().weight.device
    cache = _new_cache(model)
    kw = _forward_kwargs(anatomy, cache)
    stop = eos_ids(model)
    x = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    out, logits = [], []
    for _ in range(max_new_tokens):
        row = model(input_ids=x, **kw).logits[0, -1, :]
        tok = int(torch.argmax(row))
        out.append(tok)
        if keep_logits:
            logits.append(row.float().cpu())
        if tok in stop:
            break
        x = torch.tensor([[tok]], dtype=torch.long, device=device)
    return GreedyResult(out, logits)


class _Stop(Exception):
    pass


@dataclass
class Capture:
    """Block ``layer``'s output on the prompt pass, the arguments the model gave it, and the cache."""

    layer: int
    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]
    cache: Any


@torch.inference_mode()
def capture(model: nn.Module, anatomy: Anatomy, prompt: Sequence[int], layer: int) -> Capture:
    """Run the prompt pass up to block ``layer`` and stop there (what a checkpoint holds)."""
    block = anatomy.blocks[layer]
    seen: dict[str, Any] = {}

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["args"], seen["kwargs"] = args, kwargs

    def post(_m: nn.Module, _a: tuple, _k: dict, out: Any) -> None:
        seen["out"] = block_output(out)
        raise _Stop

    cache = _new_cache(model)
    device = model.get_input_embeddings().weight.device
    handles = [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post, with_kwargs=True)]
    try:
        model(input_ids=torch.tensor([list(prompt)], device=device), **_forward_kwargs(anatomy, cache))
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    args, kwargs = seen["args"], seen["kwargs"]
    if args:
        args = args[1:]
    else:
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    return Capture(layer, seen["out"], args, kwargs, cache)


def tail_runner(anatomy: Anatomy, cap: Capture) -> tuple[Callable[[], Any], Callable[[Any], torch.Tensor]]:
    """``(setup, run)``: ``setup()`` gives a fresh copy of the captured cache (untimed);
    ``run(cache)`` executes blocks ``layer+1..`` + final norm + head at the last position."""
    blocks = anatomy.blocks

    def setup() -> Any:
        return fork_cache(cap.cache)

    @torch.inference_mode()
    def run(cache: Any) -> torch.Tensor:
        swap = {id(cap.cache): cache}
        args = tuple(swap.get(id(a), a) for a in cap.args)
        kwargs = {k: swap.get(id(v), v) for k, v in cap.kwargs.items()}
        h = cap.hidden
        for i in range(cap.layer + 1, len(blocks)):
            h = block_output(blocks[i](h, *args, **kwargs))
        return run_tail(anatomy, h)

    return setup, run


def steering_hook(layer_module: nn.Module, kind: str, factor: float, on_call: int = 0) -> Any:
    """A forward hook that edits the block's output on its ``on_call``-th call only (0 = prompt pass)."""
    calls = {"n": 0}

    def hook(_m: nn.Module, _a: tuple, out: Any) -> Any:
        n = calls["n"]
        calls["n"] += 1
        if n != on_call:
            return None
        h = block_output(out)
        new = h * factor if kind == "scale" else h + torch.full((h.shape[-1],), factor, dtype=h.dtype, device=h.device)
        return new if isinstance(out, torch.Tensor) else (new, *out[1:])

    return layer_module.register_forward_hook(hook)
