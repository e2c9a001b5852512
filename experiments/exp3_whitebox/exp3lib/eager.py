"""Plain eager PyTorch, no djinn_nb engine: a greedy loop over the model's own forward with a KV
cache, and the "remaining layers alone" reference (blocks N+1.. + final norm + head from a
captured input).

The pause and the steering edit are the package's own tools, not copies: the capture stops the
forward with ``djinn_nb.core.pause.Trace(stop=True, keep_inputs=True)`` and the steering hook is
``djinn_nb.core.reference.edit_at``, the same hook the exactness tests compare the engine against.
So the baseline measures plain PyTorch with the least machinery a breakpoint needs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn

from djinn_nb.core import reference
from djinn_nb.core.architecture import Anatomy, run_tail
from djinn_nb.core.kvcache import fork_cache
from djinn_nb.core.pause import Trace, output_hidden


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
    cache = _new_cache(model)
    device = model.get_input_embeddings().weight.device
    with Trace(anatomy.blocks[layer], stop=True, keep_inputs=True) as t:
        model(input_ids=torch.tensor([list(prompt)], device=device), **_forward_kwargs(anatomy, cache))
    if not t.stopped or t.value is None:
        raise RuntimeError(f"the prompt pass never reached block {layer}")
    return Capture(layer, t.value, t.args, t.kwargs, cache)


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
            h = output_hidden(blocks[i](h, *args, **kwargs))
        return run_tail(anatomy, h)

    return setup, run


def steering_edit(kind: str, factor: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The config's modification as a function of the hidden state: ``scale`` or ``add``."""
    return reference.scale(factor) if kind == "scale" else reference.add(factor)


def steered(model: nn.Module, layer: int, kind: str, factor: float, on_call: int = 0) -> ContextManager[Any]:
    """While the ``with`` block runs, block ``layer``'s output is edited on its ``on_call``-th call
    only (0 = prompt pass): the same hook the package's reference makes (``djinn_nb.core.reference``)."""
    return reference.edit_at(model, layer, steering_edit(kind, factor), on_call)
