"""A residual-stream patching grid as one wave through the blocks.

Why: ``tracing.py``'s first form ran, at each traced layer ``l``, the layer's patched rows
through blocks ``l+1..L-1`` as one batch: the arithmetic a patch needs (nothing before ``l``
again), but ``L(L+1)/2`` block calls. On a GPU a small model's block is bound by its kernel
launches, not its arithmetic, so GPT-2's 12 × 16 grid cost 78 launches of each block's kernels and
was only 1.0–1.3× faster than a careful batched hook loop (one forward per layer). Here the
corrupted prompt goes through the blocks once, as row 0 of a batch, and at each traced layer the
patched rows (row 0's value there with one position's clean value restored) join the batch: every
row still runs only the blocks after its patch, but each block is called once (``L`` calls), with
the rows of every earlier layer together. The batch grows to ``1 + cells`` rows; where that is more
than ``WAVE_TOKENS`` positions the traced layers are split into waves, each from block 0.

Exactness: each row is the model's own arithmetic from block 0's input (the split a breakpoint
there makes) on its own values; only the batch it is computed in differs from a hook loop's, as
``fork_many``'s rows do (batch.py). Row 0 is the corrupted run, and a patched row whose restored
value equals the corrupted one computes the same numbers in the same batch. No KV cache is kept
(a prompt pass attends to its own positions only), so the wave holds nothing once it returns.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..errors import ExecutionError
from . import kvcache
from .architecture import run_tail
from .patchgrid import GridSpec, patched_starts
from .stepping import ORIGIN, Paused, Stepper

#: sites a wave serves: a patch there is a block's input (``resid_pre``) or output (``resid_post``)
WAVE_SITES = ("resid_pre", "resid_post")

#: the most positions (rows x prompt length) one wave's batch may reach
WAVE_TOKENS = 16384


def _before_block(layer: int, site: str) -> int:
    """The block a patch at (``layer``, ``site``) is made before (``num_layers``: before the head)."""
    return layer if site == "resid_pre" else layer + 1


def waves(spec: GridSpec, n_tokens: int) -> list[list[int]]:
    """The traced layers in waves of at most ``WAVE_TOKENS`` positions (a layer's rows stay together)."""
    groups: list[list[int]] = [[]]
    rows = 1
    for layer in spec.traced_layers():
        n = len(spec.cells[layer])
        if groups[-1] and (rows + n) * n_tokens > WAVE_TOKENS:
            groups.append([])
            rows = 1
        groups[-1].append(layer)
        rows += n
    return groups


def wave_grid(stepper: Stepper, cache: Any, corrupt_ids: list[int], restored: dict[int, torch.Tensor],
              spec: GridSpec, answer: int, between_blocks: Callable[[], None], on_row: Callable[[int], None]
              ) -> tuple[dict[int, list[float]], float]:
    """p(``answer``) for each cell of ``spec`` (rows by layer, NaN where not computed) and the
    corrupted prompt's own; ``restored[l]`` is the clean value at (l, site); ``cache`` an empty KV
    cache for the corrupted prompt's embedding (the blocks then run with none). The caller holds
    the device; ``between_blocks`` may hand it on; ``on_row(done)`` is told as layers finish."""
    x = torch.tensor([corrupt_ids], dtype=torch.long, device=stepper.device)
    try:
        stepper.forward(x, cache, ORIGIN)
        raise ExecutionError("the corrupted prompt's forward finished without reaching block 0")
    except Paused as p:
        start = p
    args, kwargs = kvcache.swap_cache(start.args, cache, None), kvcache.swap_cache(start.kwargs, cache, None)
    rows: dict[int, list[float]] = {}
    corrupt_prob = float("nan")
    for group in waves(spec, len(corrupt_ids)):
        probs, spawned = _wave(stepper, start.value, args, kwargs, restored, spec, group, answer, between_blocks)
        if not rows:
            corrupt_prob = probs[0]
        for layer, (lo, hi) in spawned.items():
            row = [float("nan")] * len(spec.columns)
            for j, prob in zip(spec.cells[layer], probs[lo:hi]):
                row[j] = prob
            rows[layer] = row
        on_row(len(rows))
    return rows, corrupt_prob


def _wave(stepper: Stepper, h0: torch.Tensor, args: tuple, kwargs: dict, restored: dict[int, torch.Tensor],
          spec: GridSpec, group: Sequence[int], answer: int, between_blocks: Callable[[], None]
          ) -> tuple[list[float], dict[int, tuple[int, int]]]:
    """One wave: row 0 the corrupted prompt from block 0's input; before each block, the rows of the
    group's layers patched there join. The answer's probability per row, and each layer's rows."""
    blocks = stepper.anatomy.blocks
    at: dict[int, list[int]] = {}
    for layer in group:
        at.setdefault(_before_block(layer, spec.site), []).append(layer)
    batch, spawned = h0, {}
    for b in range(len(blocks) + 1):
        for layer in at.get(b, ()):
            starts = patched_starts(batch[:1], restored[layer].to(batch.device), spec, spec.cells[layer], False)
            spawned[layer] = (batch.shape[0], batch.shape[0] + starts.shape[0])
            batch = torch.cat([batch, starts])
        if b == len(blocks):
            break
        if b > 0:
            between_blocks()
        out = blocks[b](batch, *args, **kwargs)
        batch = out if type(out) is torch.Tensor else out[0]
    return run_tail(stepper.anatomy, batch).float().softmax(-1)[:, answer].tolist(), spawned


__all__ = ["WAVE_SITES", "WAVE_TOKENS", "wave_grid", "waves"]
