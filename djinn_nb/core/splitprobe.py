"""The load-time exactness probe's split forward, and where armed steps enter.

:func:`split_probe` is the ``ForwardSplit`` that :func:`~djinn_nb.core.architecture.check_split_is_exact`
runs at load: the model's own forward paused at a chain of sites and continued by hand, as a run
with those breakpoints would, compared bit for bit with the model's own forward. Its first two
forwards also decide where armed steps enter the model (``entry.py``). Kept apart from
``stepping.py``, which runs steps: this runs once, at load, and only reads the stepper's split.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ExecutionError
from . import entry, kvcache
from .specs import Point
from .stepping import Paused, Stepper

__all__ = ["split_probe"]


def split_probe(stepper: Stepper, ids: torch.Tensor, cache: Any, points: Sequence[tuple[int, str]]) -> torch.Tensor:
    """The exactness probe's split forward: pause at each of ``points`` (in forward order) and
    continue by hand from it, as a run with these breakpoints in one step would; the logits.

    The probe's forwards enter the whole model; its first two (a prompt pass and a decoding
    step) also decide where armed steps enter later (:func:`_check_entry`)."""
    stops = [Point.at(layer, site) for layer, site in points]
    chosen = stepper._entry, stepper._entry_kw
    stepper._entry, stepper._entry_kw = stepper.model, stepper._model_kwargs(None)
    trial = kvcache.fork_cache(cache) if stepper._entry_checks < 2 else None
    try:
        try:
            stepper.forward(ids, cache, stops[0])
            raise ExecutionError(f"probe did not pause at {points[0]}")
        except Paused as p:
            paused = p
        if trial is not None:
            chosen = _check_entry(stepper, ids, trial, cache, paused)
        for expected in [*stops[1:], None]:
            try:
                logits = stepper.continue_from(paused.layer, paused.site, paused.value, paused.args, paused.kwargs,
                                               paused.saved, stops)
            except Paused as p:
                if Point.at(p.layer, p.site) != expected:
                    raise ExecutionError(f"probe paused at {(p.layer, p.site)}, expected {expected}") from None
                paused = p
                continue
            if expected is not None:
                raise ExecutionError(f"probe did not pause at {(expected.layer, expected.site)}")
            return logits
        raise AssertionError("unreachable")
    finally:
        stepper._entry, stepper._entry_kw = chosen
        stepper.release_traces()


def _check_entry(stepper: Stepper, ids: torch.Tensor, trial: Any, cache: Any, full: Paused) -> tuple[nn.Module, dict]:
    """Where armed steps enter: the base model if, run on ``trial`` (a copy of ``cache`` as it was),
    it pauses where the whole model's forward paused (``full``) with the same block arguments and
    values, here and at every earlier check (see entry.py); else the whole model."""
    stepper._entry_checks += 1
    base = entry.base_entry(stepper.model, stepper.anatomy.cache_arg) if stepper._base_ok is not False else None
    stepper._base_ok = False
    if base is not None:
        stepper._entry, stepper._entry_kw = base, {"use_cache": True}
        try:
            b = stepper._forward_standing(ids, trial, Point.at(full.layer, full.site))
            stepper._base_ok = entry.same_call((full.value, full.saved, full.args, full.kwargs),
                                               (b.value, b.saved, b.args, b.kwargs), cache, trial)
        except Exception:  # noqa: BLE001 - any difference keeps the whole model as the entry
            pass
        finally:
            stepper._entry, stepper._entry_kw = stepper.model, stepper._model_kwargs(None)
    if stepper._base_ok and base is not None:  # only a base entry is ever found ok
        return base, {"use_cache": True}
    return stepper.model, stepper._model_kwargs(None)
