"""Forks of one checkpoint, run as one batch.

Forks from one checkpoint have the same prompt, the same tokens so far and the
same KV cache up to the paused site; they differ only in the activation they
continue from. So the rest of the paused step runs as one batch (the starts
stacked on the batch dimension, the parent's cache repeated per row), and so do
the later steps: every row has the same length at every step, so no padding or
mask is needed, and each row's keys and values are its own. A fork leaves the
batch when it ends (its rows are dropped; a finished run keeps its own copy for
``rewind``) or when a step has something for it alone — a breakpoint or a
watch — and then runs that step and the rest on its own cache, as any run does.

Row ``i`` of a batched matmul need not equal the same row computed alone in the
last bits on every device (kernels may tile by batch size); the README states
what was measured. Sampling uses each fork's own generator, row by row.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..states import RunState
from . import graphs, kvcache
from .runs import Checkpoint, Run
from .nanguard import logits_finite
from .stepping import SLICE_TOKENS, Stepper

#: a batch whose rest of step covers more positions than this (rows x positions) runs it in groups
#: of rows, handing the device on between groups as between blocks (64 forks of a 900-token prompt
#: pass were one 57,600-position step that another user's one-token fork waited behind)
GROUP_TOKENS = 1024


def repeated_state(cp: Checkpoint, cache: Any, n: int) -> tuple[Any, tuple, dict, dict[str, torch.Tensor]]:
    """The paused step's state for ``n`` rows: a copy of ``cache`` repeated per row (the original
    untouched), the checkpoint's arguments pointing at it, and its saved sites repeated."""
    rows = kvcache.fork_cache(cache)
    rows.batch_repeat_interleave(n)
    saved = {k: v.repeat(n, *([1] * (v.dim() - 1))) if v.shape[0] == 1 else v for k, v in cp.saved.items()}
    return rows, kvcache.swap_cache(cp.args, cache, rows), kvcache.swap_cache(cp.kwargs, cache, rows), saved


class ForkBatch:
    """Runs ``members`` (new forks of ``parent``'s checkpoint) from their ``starts`` as one batch.

    After :meth:`run`, each member is done, or (listed in :attr:`left`) holds its own
    cache at the start of a step it must run alone.
    """

    def __init__(self, stepper: Stepper, parent: Run, members: Sequence[Run], starts: Sequence[torch.Tensor]):
        if len(members) != len(starts) or not members:
            raise ValueError("a batch needs one start per member")
        self.stepper = stepper
        self.members = list(members)
        self.starts = list(starts)
        if parent.checkpoint is None:
            raise ValueError("a batch forks a paused run's checkpoint")
        self.checkpoint = parent.checkpoint
        self.parent_cache = parent.cache
        self.left: list[Run] = []

    def run(self) -> None:
        """Finish the paused step for every member together, then step them together."""
        n = len(self.members)
        start = torch.cat(self.starts, 0)
        logits, cache, how = self._rest_of_step(n, start)
        for run in self.members:
            run.state = RunState.RUNNING
            run.continued_by = f"batch of {n}" + ("" if how == "eager" else f", {how}")
        active = list(self.members)
        while True:
            keep = []
            snapshot = None  # this step's cache as it is now, for the forks that end here (made once)
            for i, (run, done) in enumerate(zip(active, self.stepper.take_tokens(active, logits))):
                if not logits_finite(run):  # never a token from NaN: this fork fails, the others go on
                    run.state, run.cache = RunState.FAILED, None
                    run.error = f"non-finite logits at step {run.step - 1}: the edit made later layers overflow"
                elif done:
                    if self.stepper.keep_finished:
                        snapshot = snapshot or kvcache.fork_cache(cache)
                        run.keep_row(snapshot, i, len(active))
                    else:
                        run.cache = None
                elif self._needs_own_step(run):
                    run.cache = kvcache.row_of(cache, i, len(active))
                    self.left.append(run)
                else:
                    keep.append(i)
            if not keep:
                return
            if len(keep) < len(active):
                cache.batch_select_indices(torch.tensor(keep, dtype=torch.long, device=logits.device))
                active = [active[i] for i in keep]
            self.stepper.between_steps(active[0])
            x = torch.tensor([[run.token_ids[-1]] for run in active], dtype=torch.long, device=self.stepper.device)
            logits = self.stepper.model(input_ids=x, **self.stepper._model_kwargs(cache)).logits[:, -1, :]

    def _rest_of_step(self, n: int, start: torch.Tensor) -> tuple[torch.Tensor, Any, str]:
        """The rest of the paused step for the stacked starts: eager, and on a GPU, from the second
        batch of this size on, a replay of the captured layers (checked bit for bit at capture)."""
        cp, slot = self.checkpoint, self.checkpoint.graphs
        graph = slot.batched.get(n) if self.stepper.cuda_graphs else None
        if graph is not None:
            logits = graph.replay(start).clone()
            cache = kvcache.fork_cache(graph.cache)
            graph.copy_cache_into(cache)
            slot.replays += 1
            return logits, cache, "cuda-graph"
        cache, args, kwargs, saved = repeated_state(cp, self.parent_cache, n)

        def tail(h: torch.Tensor, a: tuple, kw: dict, turn: bool = False) -> torch.Tensor:
            return self.stepper.continue_from(cp.layer, cp.site, h, a, kw, saved, turn=turn)

        seen = slot.batches.get(n, 0)
        slot.batches[n] = seen + 1
        capture = (self.stepper.cuda_graphs and seen >= graphs.CAPTURE_AFTER and n <= graphs.MAX_BATCH_CAPTURE
                   and n not in slot.batched_disabled)
        per = max(1, GROUP_TOKENS // start.shape[1])
        if n > per and not capture:
            return self._in_groups(n, per, start)
        before = kvcache.fork_cache(cache) if capture else None  # the eager run below writes ``cache``
        logits = tail(start, args, kwargs, turn=start.shape[0] * start.shape[1] >= SLICE_TOKENS)  # never while capturing
        if not capture:
            return logits, cache, "eager"
        try:
            first_written = cp.layer if cp.site == "resid_pre" else cp.layer + 1
            graph = graphs.TailGraph(tail, first_written, start, args, kwargs, cache, before)
            graph.replay(start)
            if graph.matches(logits, cache):
                graph.keep_alive = (saved, tail)  # the graph reads the repeated saved sites by address
                slot.batched[n] = graph
                return logits, cache, "graph captured"
            slot.batched_disabled[n] = "graph replay differed from eager execution"
        except Exception as e:  # noqa: BLE001 - any capture failure keeps the eager path
            slot.batched_disabled[n] = f"capture failed: {type(e).__name__}: {e}"
        return logits, cache, "eager"

    def _in_groups(self, n: int, per: int, start: torch.Tensor) -> tuple[torch.Tensor, Any, str]:
        """The rest of the paused step ``per`` rows at a time, the device handed on between groups
        (and between blocks); the groups' caches joined into the batch's."""
        cp, logits, caches, rows = self.checkpoint, [], [], []
        for lo in range(0, n, per):
            m = min(per, n - lo)
            cache, args, kwargs, saved = repeated_state(cp, self.parent_cache, m)
            if lo:
                self.stepper.between_blocks()
            logits.append(self.stepper.continue_from(cp.layer, cp.site, start[lo:lo + m], args, kwargs, saved,
                                                     turn=True))
            caches.append(cache)
            rows.append(m)
        return torch.cat(logits), kvcache.cat_rows(caches, rows), f"in groups of {per}"

    @staticmethod
    def _needs_own_step(run: Run) -> bool:
        return any(b.covers(run.step) for b in (*run.breakpoints, *run.watches))
