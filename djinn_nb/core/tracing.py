"""Causal tracing on the server: ROME's grid in one call, no run made per cell.

Why here and not in the client: the grid is the field's most-asked patching experiment, and
built from the client API it cost a chain of forks, a ``fork_many`` of P runs per layer (each
with its own KV cache, sampler and bookkeeping), a ``token_probs`` and P closes per layer —
hundreds of round trips and run creations for a 12 × 16 grid, which made a careful researcher's
batched hook loop faster than djinn_nb. Here each prompt passes once; at the residual
stream every layer's patched rows go through the blocks as one growing batch (``tracewave.py``);
at the other sites the corrupted pass pauses at every traced layer, and at each pause of the corrupted pass the P patched starts (the clean activation restored
at one position each) run the remaining layers as one batch from that layer's checkpoint (only
the layers after it: the checkpoint holds everything before), and only the answer's probability
at the last position is kept. The clean pass records its traced layers as watches, without
pausing (only the corrupted pass needs a checkpoint per layer). The corrupted run's own next-token distribution rides in the first
layer's batch, so a cell whose patched input equals the corrupted one shows the same number.
A grid's columns (positions, or heads at ``z``), the cells to compute and each row's patch are
``patchgrid.py``'s, shared with the attribution estimate (``attribution.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import BadRequestError, RunStateError
from .batch import repeated_state
from .host import RunHost
from .patchgrid import GridSpec, patched_starts
from .runs import Checkpoint, Run
from .tracewave import WAVE_SITES, wave_grid

#: Sites a trace restores: the residual stream and each block's two outputs.
TRACE_SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")


@dataclass
class TraceGrid:
    """``rows[i][j]``: p(answer) with the clean activation restored at (layers[i], positions[j])."""

    rows: list[list[float]]
    clean_prob: float
    corrupt_prob: float
    answer: int


def tail_logits(host: RunHost, run: Run, starts: torch.Tensor) -> torch.Tensor:
    """Next-token logits (last position) of the paused step of ``run`` continued from each row of
    ``starts`` (stacked on the batch dimension), the run itself left exactly as it was: its cache
    is repeated per row (``fork_cache`` shares nothing the tail writes)."""
    cp = run.checkpoint
    if cp is None:
        raise RunStateError(f"run {run.id} is not paused")
    _, args, kwargs, saved = repeated_state(cp, run.cache, starts.shape[0])
    return host.stepper.continue_from(cp.layer, cp.site, starts, args, kwargs, saved)


def check_grid(num_layers: int, n_tokens: int, layers: Sequence[int] | None,
               positions: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """The grid's layers (sorted, distinct; default all) and positions (distinct; default all)."""
    for name, given in (("layers", layers), ("positions", positions)):
        if given is not None and (not isinstance(given, (list, tuple)) or any(type(x) is not int for x in given)):
            raise BadRequestError(f"{name} must be a list of integers, got {str(given)[:100]!r}")
    layers = list(range(num_layers)) if layers is None else sorted(set(layers))
    positions = list(range(n_tokens)) if positions is None else list(positions)
    if not layers or any(not 0 <= x < num_layers for x in layers):
        raise BadRequestError(f"layers must be integers in 0..{num_layers - 1}, got {layers!r}"[:200])
    if not positions or any(type(p) is not int or not 0 <= p < n_tokens for p in positions):
        raise BadRequestError(f"positions must be integers in 0..{n_tokens - 1}, got {positions!r}"[:200])
    if len(set(positions)) != len(positions):
        raise BadRequestError("positions must be distinct")
    return layers, positions


def causal_trace(
    host: RunHost,
    generate: Callable[..., Run],
    resume: Callable[[str], Run],
    close: Callable[[str], None],
    clean_ids: list[int],
    corrupt_ids: list[int],
    layers: Sequence[int],
    positions: Sequence[int],
    site: str = "resid_post",
    answer: int | None = None,
    on_row: Callable[[int], None] = lambda done: None,
    spec: GridSpec | None = None,
) -> TraceGrid:
    """The grid (see the module's docstring). ``generate``/``resume``/``close`` are the engine's,
    bound to the caller (its runs, its device turns); both runs are closed however it ends.
    ``on_row(i)`` is told after each row (progress; it may raise to stop the trace). ``spec``
    (patchgrid.py) gives per-head columns at ``z`` and the cells to compute; its rows are only
    the layers with a cell, a cell not computed is NaN."""
    if spec is None:
        if site not in TRACE_SITES:
            raise BadRequestError(f"causal_trace patches one of {list(TRACE_SITES)}, not {site!r}")
        spec = GridSpec(site, list(layers), list(positions), [], {layer: list(range(len(positions))) for layer in layers})
    site, layers = spec.site, spec.traced_layers()
    if len(clean_ids) != len(corrupt_ids):
        raise BadRequestError(f"the clean and corrupted prompts must have the same number of tokens: "
                              f"{len(clean_ids)} vs {len(corrupt_ids)}")
    bps = [(layer, 0, site) for layer in layers]
    opened: list[str] = []
    try:
        # the clean pass records every traced layer without pausing: one forward, no pause per layer
        clean = generate(clean_ids, 1, [], record_logits=True, watches=bps)
        opened.append(clean.id)
        restored = {hit.layer: hit.tensor for hit in clean.watch_log if hit.step == 0}
        if clean.last_logits is None or sorted(restored) != sorted(layers):
            raise RunStateError(f"the clean pass recorded layers {sorted(restored)} of {list(layers)}")
        if answer is None:
            answer = clean.token_ids[-1]
        vocab = clean.last_logits.shape[-1]
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < vocab:
            raise BadRequestError(f"answer must be a token id in 0..{vocab - 1}, got {answer!r}"[:200])
        clean_prob = float(clean.last_logits.float().softmax(-1)[answer])
        if site in WAVE_SITES:  # the residual stream: every layer's rows in one wave (tracewave.py)
            with host.device_turn(), torch.inference_mode():
                by_layer, corrupt_prob = wave_grid(host.stepper, host.new_cache(), corrupt_ids, restored, spec, answer,
                                                   host.stepper.between_blocks, on_row)
            return TraceGrid([by_layer[layer] for layer in layers], clean_prob, corrupt_prob, answer)
        corrupt = generate(corrupt_ids, 1, bps)
        opened.append(corrupt.id)
        rows: list[list[float]] = []
        corrupt_prob = float("nan")
        while corrupt.checkpoint is not None:
            cp = corrupt.checkpoint
            probs = _row(host, corrupt, cp, restored[cp.layer], spec, answer, with_reference=not rows)
            if not rows:
                *probs, corrupt_prob = probs
            rows.append(probs)
            on_row(len(rows))
            corrupt = resume(corrupt.id)
        return TraceGrid(rows, clean_prob, corrupt_prob, answer)
    finally:
        for run_id in opened:
            try:
                close(run_id)
            except Exception:  # noqa: BLE001 - closing what this call made: it may already be gone
                pass


def _row(host: RunHost, run: Run, cp: Checkpoint, clean: torch.Tensor, spec: GridSpec, answer: int,
         with_reference: bool) -> list[float]:
    """One layer's cells: the paused activation with one column's clean value restored per row
    (plus the unpatched activation, ``with_reference``, last), the rest of the step as one batch;
    NaN in the columns the spec does not compute at this layer."""
    chosen = spec.cells[cp.layer]
    with run.lock, host.device_turn(), torch.inference_mode():
        host.paused(run)
        starts = patched_starts(cp.pending, clean.to(cp.pending.device), spec, chosen, with_reference)
        probs = tail_logits(host, run, starts).float().softmax(-1)[:, answer].tolist()
    row = [float("nan")] * len(spec.columns)
    for j, p in zip(chosen, probs):
        row[j] = p
    return row + probs[len(chosen):]


__all__ = ["TRACE_SITES", "TraceGrid", "causal_trace", "check_grid", "tail_logits"]
