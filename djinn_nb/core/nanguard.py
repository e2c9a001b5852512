"""The NaN guard: non-finite logits never become a token, and a failed call leaves a paused run as it was.

Why here, apart: every call snapshots what it may change (cheaply: lengths and references,
:class:`Snapshot`), and a step whose logits are NaN or infinite (an edit's overflow, say) raises
:class:`NonFiniteLogits` before its token is used. Then the call fails naming the block whose
output stopped being finite, and a resumed run is put back exactly where it was paused: its KV
cache (``kvcache.CacheMark``), its per-step records (``trajectory.Mark``), its sampler and its
navigation state. A new run (generate, fork) that fails is closed instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import NonFiniteError
from ..states import RunState
from . import kvcache
from .trajectory import Mark

__all__ = ["NonFiniteLogits", "Snapshot", "logits_finite", "on_non_finite", "roll_back"]


class NonFiniteLogits(Exception):
    """A step's logits were NaN or infinite (raised before their token is used)."""

    def __init__(self, step: int, checkpoint: Any, start: torch.Tensor | None):
        super().__init__(f"non-finite logits at step {step}")
        self.step, self.checkpoint, self.start = step, checkpoint, start


def logits_finite(run: Any) -> bool:
    """Whether the step just picked came from finite logits: a NaN or +inf anywhere makes the
    top log-probability NaN, so this costs no device work beyond what ``pick`` read."""
    return bool(run.topk) and math.isfinite(run.topk[-1][0][1])


@dataclass
class Snapshot:
    """What a call may change in a run, taken before it runs (cheap: lengths and references).

    Only a paused run is ever put back (a new run that fails is closed), so only a paused
    run's cache is marked.
    """

    state: Any
    step: int
    checkpoint: Any
    cache: kvcache.CacheMark | None
    trajectory: Mark  # the run's per-step records
    generator_state: Any
    navigation: tuple = ()  # target, forced stops, the last tested step, the last pause

    @classmethod
    def of(cls, run: Any) -> "Snapshot":
        paused = run.state == RunState.PAUSED
        return cls(
            run.state, run.step, run.checkpoint,
            kvcache.CacheMark(run.cache, run.checkpoint) if paused and run.cache is not None else None,
            run.trajectory.mark(),
            run.generator.get_state() if run.generator is not None and paused else None,
            (run.target, set(run.forced), run.forced_step, run.checked_step, run.last_point, run.held) if paused else (),
        )


def first_non_finite_block(cache: Any, new_positions: int) -> int | None:
    """The first block whose keys/values for the latest ``new_positions`` are not finite: its input
    (the previous block's output) was not. None when every block's are finite."""
    for i, layer in enumerate(getattr(cache, "layers", [])):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-2] >= new_positions:
                if not bool(torch.isfinite(t[..., -new_positions:, :]).all()):
                    return i
    return None


def non_finite_error(run: Any, exc: NonFiniteLogits, num_layers: int) -> str:
    n_new = len(run.prompt_ids) if exc.step == 0 else 1
    block = first_non_finite_block(run.cache, n_new)
    if block is None:
        where = f"after layer {num_layers - 1} (its output was finite: the final norm or the head overflowed)"
    elif block == 0:
        where = "before layer 0 (the embeddings)"
    else:
        where = f"at layer {block - 1} (its output, the input of layer {block}, is the first that is not finite)"
    return (f"run {run.id}: the logits of step {exc.step} are not finite (NaN or inf); values stopped being "
            f"finite {where}; no token was taken from them")


def roll_back(run: Any, snap: Snapshot) -> None:
    """Put a paused run back exactly as ``snap`` found it: its cache's layers cropped back to their
    lengths then (see :class:`kvcache.CacheMark`), tokens and logs cut."""
    if run.cache is not None and snap.cache is not None:
        snap.cache.restore(run.cache)
    run.trajectory.undo(snap.trajectory)
    run.step, run.checkpoint, run.state = snap.step, snap.checkpoint, snap.state
    if snap.navigation:
        run.target, run.forced, run.forced_step, run.checked_step, run.last_point, run.held = snap.navigation
    if snap.generator_state is not None:
        run.generator.set_state(snap.generator_state)


def on_non_finite(engine: Any, run: Any, snap: Snapshot, exc: NonFiniteLogits) -> None:
    """A resumed run goes back to its pause; a new run (generate, fork) fails. Raises the error."""
    message = non_finite_error(run, exc, engine.num_layers)
    if snap.state == RunState.PAUSED:
        roll_back(run, snap)
        cp = run.checkpoint
        raise NonFiniteError(f"{message}; the run is still paused at layer {cp.layer} step {cp.step}")
    engine._free(run, RunState.FAILED)
    run.error = message
    raise NonFiniteError(message)
