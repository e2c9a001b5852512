"""Plain HF + torch hooks: what djinn_nb's runs must reproduce exactly."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers import AutoModelForCausalLM

from djinn_nb.architecture import find_anatomy

_loaded: dict[str, torch.nn.Module] = {}


def hf_model(path: str) -> torch.nn.Module:
    if path not in _loaded:
        _loaded[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _loaded[path]


def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    edit_layer: int | None = None,
    edit_call: int = 0,
    edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[int]:
    """Greedy ``model.generate``; optionally a forward hook edits block ``edit_layer``'s
    output on its ``edit_call``-th call (0 = the prompt pass, k = k-th decoding step)."""
    handle = None
    if edit_layer is not None:
        calls = {"n": 0}

        def hook(_mod, _inp, out):
            n = calls["n"]
            calls["n"] += 1
            if n != edit_call:
                return None
            if isinstance(out, tuple):
                return (edit(out[0]),) + tuple(out[1:])
            return edit(out)

        handle = find_anatomy(model).blocks[edit_layer].register_forward_hook(hook)
    try:
        ids = torch.tensor([list(prompt_ids)], device=model.device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, ids.shape[1]:].tolist()
    finally:
        if handle is not None:
            handle.remove()
