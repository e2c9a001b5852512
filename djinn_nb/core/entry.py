"""Where an armed step's forward enters the model: the base model, where that is the same computation.

A step that pauses in a block never reaches the LM head, yet entering the model through its
causal-LM wrapper costs the wrapper's frames twice: on the way in, and again when the pause
unwinds through them (a third of the frames between the stop and the step loop, on GPT-2 and
Llama). HF's wrapper calls its base model (``model.base_model``, which owns the blocks) with
the same inputs, so the stepper may enter there instead — but only once the load-time probe
has seen both entries reach the paused block with the same arguments and the same value, bit
for bit (:func:`same_call`); otherwise the whole model stays the entry.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn


def base_entry(model: nn.Module, cache_arg: str) -> nn.Module | None:
    """The model's base model, if it is a separate module that takes the KV cache as ``cache_arg``."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        return None
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return None
    return base if cache_arg in params and "input_ids" in params else None


def same_call(a: Any, b: Any, cache_a: Any, cache_b: Any) -> bool:
    """Whether two captured calls of a block are the same: tensors equal bit for bit (same dtype,
    shape and device), ``cache_b`` where ``a`` has ``cache_a``, containers alike, anything else equal
    (an object without its own equality must be the same object: so an unknown one never passes)."""
    if a is cache_a:
        return b is cache_b
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_call(x, y, cache_a, cache_b) for x, y in zip(a, b))
    if isinstance(a, dict):
        return (type(b) is dict and a.keys() == b.keys()
                and all(same_call(a[k], b[k], cache_a, cache_b) for k in a))
    if a is None or isinstance(a, (bool, int, float, str)):
        return type(a) is type(b) and a == b
    return a is b


__all__ = ["base_entry", "same_call"]
