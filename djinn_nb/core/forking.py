"""Forks and patches: new runs from a paused run's checkpoint, one or many at a time.

A fork shares everything before the checkpoint with its parent (the KV cache's
tensors, the block's arguments) and runs only what comes after it. ``fork_many``
starts several forks of one checkpoint and hands the ones that can go together
to :mod:`batch`, which runs the remaining layers and the later steps as one
batch. ``patch_from`` moves an activation from one paused run into another
without it leaving the server; the source is read under its own lock, released
before the target's is taken, so two runs patching from each other cannot
deadlock.

:class:`Forks` is given the engine as a :class:`~djinn_nb.core.host.RunHost` (runs by id,
the checks every call makes, the one way to run a run) and uses nothing else of it.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from ..errors import ActivationError, BadRequestError, ExecutionError
from ..states import RunState
from . import kvcache
from .batch import ForkBatch
from .edits import PatchSource, apply_edit
from .host import RunHost
from .runs import Checkpoint, Run
from .scheduler import CallStopped
from .specs import Edit, Point

#: the most forks one ``fork_many`` call starts
MAX_FORKS = 256


@dataclass
class ForkSpec:
    """One fork of ``fork_many``: its edit, breakpoints (``None``: the parent's) and length."""

    edit: Edit | None = None
    breakpoints: Iterable[Any] | None = None
    max_new_tokens: int | None = None


class Forks:
    """``fork``, ``fork_many`` and ``patch_from`` resolution, over the runs of a :class:`RunHost`."""

    def __init__(self, host: RunHost):
        self._host = host

    def fork(
        self,
        run_id: str,
        edit: Edit | None = None,
        breakpoints: Iterable[Any] | None = None,
        owner: str = "",
        max_new_tokens: int | None = None,
    ) -> Run:
        """A new run continued from this run's checkpoint; the original stays paused, untouched.

        ``breakpoints=None`` keeps the parent's; pass ``[]`` to run the fork to its end.
        ``max_new_tokens`` shortens (or lengthens) the fork; it must exceed the paused step.
        """
        return self.fork_many(run_id, [ForkSpec(edit, breakpoints, max_new_tokens)], owner)[0]

    def fork_many(self, run_id: str, forks: Sequence[ForkSpec], owner: str = "") -> list[Run]:
        """One new run per ``ForkSpec``, all from this run's checkpoint; the original stays paused.

        Every fork is checked before any starts; if any fails, every fork of the call is closed
        and the error raised. Forks with nothing to stop or record
        at the rest of the paused step run it as one batch, and keep generating as a
        batch (each with its own KV cache rows and its own end) until one needs a step
        of its own (a breakpoint or a watch), which it then runs alone.
        """
        if not isinstance(forks, (list, tuple)) or not forks:
            raise BadRequestError("fork_many takes a non-empty list of forks")
        if len(forks) > MAX_FORKS:
            raise BadRequestError(f"fork_many starts at most {MAX_FORKS} forks at once, got {len(forks)}")
        host = self._host
        patches = [self.patch_source(f.edit, owner) for f in forks]
        parent = host.get(run_id, owner)
        with parent.lock:
            cp = host.paused(parent)
            host.residency.restore(parent)  # puts the checkpoint's tensors back in place
            planned = []
            for spec, patch in zip(forks, patches):
                start = self.edited(cp, spec.edit, patch, check_finite=len(forks) == 1)
                limit = parent.max_new_tokens if spec.max_new_tokens is None else spec.max_new_tokens
                if isinstance(limit, bool) or not isinstance(limit, int) or limit <= cp.step:
                    raise BadRequestError(
                        f"max_new_tokens for a fork paused at step {cp.step} must be an integer > {cp.step}, got {limit!r}"
                    )
                host.check_positions(len(parent.prompt_ids), limit)
                bps = (
                    tuple(b for b in parent.breakpoints if b.step is None or b.step < limit)
                    if spec.breakpoints is None
                    else host.breakpoints(spec.breakpoints, limit)
                )
                planned.append((start, limit, bps))
            if len(forks) > 1:  # every start's finiteness in one device read
                finite = torch.isfinite(torch.stack([p[0] for p in planned])).flatten(1).all(1).tolist()
                if not all(finite):
                    raise ActivationError(
                        f"fork {finite.index(False)}: the edit makes the activation non-finite in "
                        f"{str(cp.hidden.dtype).replace('torch.', '')} (overflow); no fork was started"
                    )
            children = [self._child(parent, limit, bps, owner) for _, limit, bps in planned]
            starts = [start for start, _, _ in planned]
            here = Point.at(cp.layer, cp.site)
            alone = [self._needs_own_step(c, cp.step, here) for c in children]
            together = [(c, s) for c, s, a in zip(children, starts, alone) if not a]
            batch = ForkBatch(host.stepper, parent, [c for c, _ in together], [s for _, s in together]) \
                if len(together) > 1 else None
            for child, own in zip(children, alone):
                if own or batch is None:
                    self._give_state(child, parent, cp)
        for child in children:
            host.adopt(child)
        try:
            if batch is not None:
                self._advance_batch(batch)
            for child, start in zip(children, starts):
                if batch is None or child not in batch.members:
                    with child.lock:
                        host.advance(child, start)
        except BaseException as e:
            # The caller gets an error, never the forks' ids: none may stay behind, counted to
            # its owner (failed, half-run, or never started) until a lease ends.
            for child in children:
                host.discard(child)
            if isinstance(e, CallStopped):  # stopped between batch steps: the call's own error
                raise e.error from None
            raise
        return children

    # ----- helpers ----------------------------------------------------------------
    def _child(self, parent: Run, limit: int, bps: tuple, owner: str) -> Run:
        gen = None
        if parent.generator is not None:
            gen = torch.Generator(device=self._host.device)
            gen.set_state(parent.generator.get_state())
        return Run(
            id=self._host.new_run_id(owner),
            owner=owner,
            prompt_ids=list(parent.prompt_ids),
            max_new_tokens=limit,
            breakpoints=bps,
            watches=parent.watches,
            trajectory=parent.trajectory.forked(),
            sampling=parent.sampling,
            generator=gen,
            cache=None,
            record_logits=parent.record_logits,
            step=parent.step,
            parent=parent.id,
            last_point=parent.last_point,
        )

    @staticmethod
    def _give_state(child: Run, parent: Run, cp: Checkpoint) -> None:
        """A fork's own KV cache (sharing the parent's tensors) and a checkpoint pointing at it
        (``cp``: the parent's)."""
        t0 = time.perf_counter()
        cache = kvcache.fork_cache(parent.cache)
        child_cp = Checkpoint(
            cp.layer, cp.step, cp.hidden, cp.pending,
            kvcache.swap_cache(cp.args, parent.cache, cache),
            kvcache.swap_cache(cp.kwargs, parent.cache, cache),
            cp.site, cp.saved, graphs=cp.graphs,
        )
        child.cache, child.checkpoint = cache, child_cp
        child.timings["fork_copy"] = time.perf_counter() - t0

    @staticmethod
    def _needs_own_step(run: Run, step: int, here: Point) -> bool:
        """Whether a fork must finish the paused step alone: something to stop at or record after ``here``."""
        later = [b for b in (*run.breakpoints, *run.watches) if b.covers(step) and b.point > here]
        return bool(later)

    def patch_source(self, edit: Edit | None, owner: str) -> PatchSource | None:
        """Resolve ``edit.patch_from`` to the source run's activation (read under its lock only)."""
        if edit is None or edit.patch_from is None:
            return None
        if type(edit.patch_from) is not str or not edit.patch_from:
            raise BadRequestError("patch_from must be a run id")
        src = self._host.get(edit.patch_from, owner)
        with src.lock:
            cp = self._host.paused(src)
            self._host.residency.restore(src)
            return PatchSource(src.id, cp.where, cp.pending)

    @staticmethod
    def edited(cp: Checkpoint, edit: Edit | None, patch: PatchSource | None = None,
                check_finite: bool = True) -> torch.Tensor:
        """The activation to continue from: the pending one with ``edit`` applied (validated)."""
        return apply_edit(cp.hidden, cp.pending, cp.site, edit, cp.where, patch, check_finite, cp.layer)

    def _advance_batch(self, batch: ForkBatch) -> None:
        """Run a batch of forks under the device lock; each member's lock held throughout."""
        with contextlib.ExitStack() as stack:
            for run in batch.members:
                stack.enter_context(run.lock)
            with self._host.device_turn(), torch.inference_mode():
                t0 = time.perf_counter()
                try:
                    batch.run()
                except Exception as e:  # noqa: BLE001 - the batch's caches may be half-written
                    failed = [r for r in batch.members if r.state == RunState.RUNNING]
                    for run in failed[1:]:
                        with contextlib.suppress(ExecutionError):
                            self._host.fail(run, f"{type(e).__name__}: {e}")
                    if failed:
                        self._host.fail(failed[0], f"{type(e).__name__}: {e}")
                    raise
                finally:
                    for run in batch.members:
                        run.timings["execute"] = time.perf_counter() - t0
        for run in batch.left:  # forks that need a step of their own from here
            with run.lock:
                self._host.advance(run, None)
