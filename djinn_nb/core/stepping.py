"""A generation step: the model's forward until a pause, the rest from a checkpoint, the token.

A step with no breakpoint is the model's own forward. A step with one runs the
model's own forward under :class:`~djinn_nb.core.pause.Trace` hooks that stop it
at the first breakpoint's site (``Paused``, which the engine turns into a
checkpoint); a stop with nothing watched keeps its traces hooked, idle, from one
step to the next (released when the run ends), since adding and removing hooks
at every step was much of an armed step's host cost, enters the base model where
the probe found that the same computation (``entry.py``: fewer frames to unwind),
and hands its pause back as a value. Continuing from a checkpoint finishes that block by hand
(:func:`~djinn_nb.core.sites.finish_block`), calls the later blocks with the
arguments the model gave the paused one, then the final norm and head — the
split the load-time probe (``splitprobe.py``) checks bit for bit against the
model's own forward. Later breakpoints and watches of the same step are met on
the way. A fork's continuation may replay as a CUDA graph (``graphs.py``).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import ExecutionError
from ..states import RunState
from . import graphs, kvcache
from .architecture import Anatomy, run_tail
from .pause import StopForward, Trace, output_hidden
from .conditional import StepTest
from .saes import SaeRegistry
from .runs import Checkpoint, Run
from .trajectory import WatchHit
from .nanguard import NonFiniteLogits, logits_finite
from .sampling import TOP_K, pick_tokens
from .sites import BlockParts, finish_block
from .specs import Point


#: ``on_watch(layer, site, value)``: a watch's record.
OnWatch = Callable[[int, str, torch.Tensor], None]

#: how many stop points keep their traces standing between steps (least recently used go)
STANDING = 4

#: a step over at least this many positions (rows x new tokens) hands the device on between its
#: blocks (``between_blocks``), split at block 0's input (``ORIGIN``) as a breakpoint there splits it
SLICE_TOKENS, ORIGIN = 64, Point.at(0, "resid_pre")


class Paused(Exception):
    """The step stopped at a breakpoint: the site's value and what continuing needs."""

    def __init__(self, layer: int, site: str, value: torch.Tensor, args: tuple, kwargs: dict,
                 saved: dict[str, torch.Tensor], capture_s: float = 0.0):
        super().__init__(layer, site)
        self.layer, self.site, self.value = layer, site, value
        self.args, self.kwargs, self.saved, self.capture_s = args, kwargs, saved, capture_s


def _seen(value: torch.Tensor | None) -> torch.Tensor:
    """A trace's recorded value, where the forward reached it (the stop was met after it)."""
    if value is None:
        raise ExecutionError("a trace the forward passed recorded no value")
    return value


def _watcher(on_watch: OnWatch | None) -> OnWatch:
    """``on_watch``, given whenever something is watched."""
    if on_watch is None:
        raise ValueError("watches are recorded through on_watch")
    return on_watch


class Stepper:
    """Runs the forward passes of one model, split at sites; knows nothing of registries or locks."""

    def __init__(self, model: nn.Module, anatomy: Anatomy, parts: Sequence[BlockParts], eos_ids: frozenset[int],
                 cuda_graphs: bool):
        self.model, self.anatomy, self.parts = model, anatomy, list(parts)
        self.eos_ids, self.cuda_graphs = eos_ids, cuda_graphs
        self.device = anatomy.head_weight.device
        self._blocks = list(anatomy.blocks)  # indexing an nn.ModuleList costs microseconds per call
        #: called between two steps of one ``advance`` (the run's lock held, no device work in
        #: flight): where a scheduler may hand the device to another run, or cancel this call
        self.between_steps: Callable[[Run], None] = lambda run: None
        #: called between two blocks of a long step (``SLICE_TOKENS``): where the scheduler may
        #: hand the device on (no trace active; only this step's own cache is half-written)
        self.between_blocks: Callable[[], None] = lambda: None
        #: whether others have waited for the device lately: a long step then splits each block at
        #: ``resid_mid`` too, handing the device on between its attention and its MLP
        self.contended: Callable[[], bool] = lambda: False
        self._halvable = [p.missing("resid_mid") is None for p in self.parts]
        #: finished runs keep their KV cache (for ``rewind``) until closed
        self.keep_finished = False
        self.saes = SaeRegistry()  # the loaded SAEs, whose features conditions read (saes.py)
        #: a stop point's traces (inputs, stopper, saved, all, sites kept), hooked and idle between steps
        self._standing: dict[Point, tuple[Trace, Trace, dict[str, Trace], list[Trace], tuple[str, ...]]] = {}
        #: what an armed step's forward enters: the whole model, or its base model once the probe
        #: found that the same computation (entry.py), and the keywords it takes besides the ids
        self._entry: nn.Module = model
        self._entry_kw: dict[str, Any] = self._model_kwargs(None)
        self._entry_checks = 0
        self._base_ok: bool | None = None

    # ----- one forward, split at sites ---------------------------------------------
    def _model_kwargs(self, cache: Any) -> dict[str, Any]:
        kw: dict[str, Any] = {self.anatomy.cache_arg: cache, "use_cache": True}
        if self.anatomy.logits_to_keep:
            kw["logits_to_keep"] = 1
        return kw

    def _watch_traces(self, stack: contextlib.ExitStack, layer: int, watches: Sequence[str],
                      on_watch: OnWatch | None) -> None:
        """Enter a trace on block ``layer`` for each watched site, recording through ``on_watch``."""
        if not watches:
            return
        if on_watch is None:
            raise ValueError("watches are recorded through on_watch")
        parts = self.parts[layer]
        for site in watches:
            module, pre = parts.point(site)
            record = (lambda v, s=site: on_watch(layer, s, parts.as_site(s, v)))  # noqa: E731
            stack.enter_context(Trace(module, pre=pre, on_value=record))

    def _stop_traces(self, stack: contextlib.ExitStack, layer: int, stop: str,
                     keep_inputs: bool) -> tuple[Trace, Trace, dict[str, Trace]]:
        """Enter traces on block ``layer`` to stop at ``stop``: the block's inputs, the earlier
        sites finishing it will need, and the stop itself."""
        parts = self.parts[layer]
        inputs = stack.enter_context(Trace(parts.block, pre=True, keep_inputs=keep_inputs, stop=stop == "resid_pre"))
        saved = {}
        for site in parts.needs(stop):
            if site != "resid_pre":
                module, pre = parts.point(site)
                saved[site] = stack.enter_context(Trace(module, pre=pre))
        if stop == "resid_pre":
            return inputs, inputs, saved
        module, pre = parts.point(stop)
        stopper = stack.enter_context(Trace(module, pre=pre, stop=True))
        return inputs, stopper, saved

    def _paused(self, layer: int, stop: str, inputs: Trace, stopper: Trace, saved: dict[str, Trace],
                args: tuple, kwargs: dict, t0: float) -> Paused:
        parts = self.parts[layer]
        values = {"resid_pre": inputs.value, **{k: t.value for k, t in saved.items()}}
        kept = {k: _seen(values[k]) for k in ("resid_pre", *parts.needs(stop))}
        return Paused(layer, stop, parts.as_site(stop, _seen(stopper.value)), args, kwargs, kept,
                      time.perf_counter() - t0)

    def forward(self, ids: torch.Tensor, cache: Any, stop: Point | None, watches: Sequence[Point] = (),
                on_watch: OnWatch | None = None) -> torch.Tensor:
        """The model's own forward; next-token logits, or ``Paused`` at ``stop``.

        Watches at points up to ``stop`` are recorded on the way.
        """
        by_layer: dict[int, list[str]] = {}
        for w in watches:
            if stop is None or w <= stop:
                by_layer.setdefault(w.layer, []).append(w.site)
        if stop is not None and not by_layer:
            raise self._forward_standing(ids, cache, stop)
        with contextlib.ExitStack() as stack:
            for layer, sites in by_layer.items():
                if stop is None or layer != stop.layer:
                    self._watch_traces(stack, layer, sites, on_watch)
            if stop is None:
                return self.model(input_ids=ids, **self._model_kwargs(cache)).logits[:, -1, :]
            self._watch_traces(stack, stop.layer, by_layer.get(stop.layer, ()), on_watch)
            inputs, stopper, saved = self._stop_traces(stack, stop.layer, stop.site, keep_inputs=True)
            t0 = time.perf_counter()
            self.model(input_ids=ids, **self._model_kwargs(cache))
        if stopper.stopped:
            raise self._paused(stop.layer, stop.site, inputs, stopper, saved, inputs.args, inputs.kwargs, t0)
        raise ExecutionError(f"the forward finished without reaching block {stop.layer}")

    def _forward_standing(self, ids: torch.Tensor, cache: Any, stop: Point) -> Paused:
        """``forward`` to ``stop`` with nothing to watch, on traces that stay hooked between steps;
        the pause is returned, not raised (the step loop's hot path)."""
        traces = self._standing.pop(stop, None)
        if traces is None:
            with contextlib.ExitStack() as stack:
                inputs, stopper, saved = self._stop_traces(stack, stop.layer, stop.site, True)
                stack.pop_all()  # they stay hooked
            every = list({id(t): t for t in (inputs, *saved.values(), stopper)}.values())
            traces = (inputs, stopper, saved, every, self.parts[stop.layer].needs(stop.site))
            while len(self._standing) >= STANDING:
                self.release_traces(next(iter(self._standing)))
        self._standing[stop] = traces  # most recently used last
        inputs, stopper, saved, every, needs = traces
        for t in every:
            t.active = True
        kw = dict(self._entry_kw)
        kw[self.anatomy.cache_arg] = cache
        try:
            t0 = time.perf_counter()
            self._entry(input_ids=ids, **kw)
        except StopForward as e:
            if e.trace is not stopper:
                raise
            kept = {"resid_pre": _seen(inputs.value)}
            for site in needs:
                kept[site] = _seen(saved[site].value if site != "resid_pre" else inputs.value)
            value = _seen(stopper.value)
            if stop.site == "z":
                value = self.parts[stop.layer].as_site("z", value)
            return Paused(stop.layer, stop.site, value, inputs.args, inputs.kwargs, kept, time.perf_counter() - t0)
        finally:
            for t in every:
                t.active = False
                t.forget()
        raise ExecutionError(f"the forward finished without reaching block {stop.layer}")

    def sliced_forward(self, ids: torch.Tensor, cache: Any, stops: Sequence[Point] = (),
                       watches: Sequence[Point] = (), on_watch: OnWatch | None = None) -> torch.Tensor:
        """``forward`` for a long step, handing the device on between blocks: the model's own
        forward paused at block 0's input, the blocks continued by hand from there (``turn``)."""
        try:
            self.forward(ids, cache, ORIGIN, [w for w in watches if w <= ORIGIN], on_watch)
            raise ExecutionError("the forward finished without reaching block 0")
        except Paused as p:
            start = p
        return self.continue_from(0, "resid_pre", start.value, start.args, start.kwargs, start.saved, stops,
                                  watches, on_watch, turn=True)

    def release_traces(self, point: Point | None = None) -> None:
        """Unhook the standing traces of ``point`` (``None``: of every point)."""
        for p in [point] if point is not None else list(self._standing):
            for t in self._standing.pop(p, (None, None, None, []))[3]:
                t.unhook()

    def _block(self, layer: int, h: torch.Tensor, args: tuple, kwargs: dict, stop: str | None,
               watches: Sequence[str], on_watch: OnWatch | None) -> torch.Tensor:
        """Block ``layer``'s own forward from ``resid_pre`` with traces at its inner sites."""
        block = self.anatomy.blocks[layer]
        if stop is None and not watches:
            return output_hidden(block(h, *args, **kwargs))
        with contextlib.ExitStack() as stack:
            self._watch_traces(stack, layer, watches, on_watch)
            if stop is None:
                return output_hidden(block(h, *args, **kwargs))
            inputs, stopper, saved = self._stop_traces(stack, layer, stop, keep_inputs=False)
            t0 = time.perf_counter()
            return output_hidden(block(h, *args, **kwargs))
        raise self._paused(layer, stop, inputs, stopper, saved, args, kwargs, t0)

    def continue_from(self, layer: int, site: str, h: torch.Tensor, args: tuple, kwargs: dict,
                      saved: dict[str, torch.Tensor], stops: Sequence[Point] = (), watches: Sequence[Point] = (),
                      on_watch: OnWatch | None = None, turn: bool = False) -> torch.Tensor:
        """From ``site`` of block ``layer`` (value ``h``) to the next-token logits, nothing before it
        recomputed; ``Paused`` at the first of ``stops`` after it, watches recorded on the way.
        ``turn``: call ``between_blocks`` before each later block (a long step)."""
        here = Point.at(layer, site)
        first = min((p for p in stops if p > here), default=None)
        watched = [w for w in watches if w > here and (first is None or w <= first)]
        blocks = self.anatomy.blocks
        if first is None and not watched:  # nothing to meet on the way: the blocks back to back
            if site != "resid_post":
                h = self._finish(layer, site, h, saved, args, kwargs, None, (), None)
            if turn:
                for i in range(layer + 1, len(self._blocks)):
                    h = self._turn_block(i, h, args, kwargs)
                return run_tail(self.anatomy, h)
            for block in self._blocks[layer + 1:]:
                h = block(h, *args, **kwargs)
                if type(h) is not torch.Tensor:  # output_hidden inline: no call per block
                    h = output_hidden(h)
            return run_tail(self.anatomy, h)
        for i in range(layer, len(blocks)):
            inner_stop = first.site if first is not None and first.layer == i and first.site != "resid_post" else None
            inner_watch = [w.site for w in watched if w.layer == i and w.site not in ("resid_pre", "resid_post")]
            if i > layer:
                if turn:
                    self.between_blocks()
                if any(w.layer == i and w.site == "resid_pre" for w in watched):
                    _watcher(on_watch)(i, "resid_pre", h)
                if inner_stop == "resid_pre":
                    raise Paused(i, "resid_pre", h, args, kwargs, {"resid_pre": h})
                block_input = h
                h = self._block(i, h, args, kwargs, inner_stop, inner_watch, on_watch)
            else:
                block_input = saved.get("resid_pre", h)
                h = self._finish(i, site, h, saved, args, kwargs, inner_stop, inner_watch, on_watch)
            if any(w.layer == i and w.site == "resid_post" for w in watched):
                _watcher(on_watch)(i, "resid_post", h)
            if first is not None and first.layer == i and first.site == "resid_post":
                raise Paused(i, "resid_post", h, args, kwargs, {"resid_pre": block_input})
        return run_tail(self.anatomy, h)

    def _turn_block(self, i: int, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """Block ``i`` of a long step, the device handed on before it and, while others wait for
        turns, between its attention and its MLP (paused at ``resid_mid`` and finished from there,
        as a breakpoint there does)."""
        self.between_blocks()
        if not (self._halvable[i] and self.contended()):
            return output_hidden(self._blocks[i](h, *args, **kwargs))
        try:
            self._block(i, h, args, kwargs, "resid_mid", (), None)
        except Paused as p:
            self.between_blocks()
            return self._finish(i, "resid_mid", p.value, p.saved, args, kwargs, None, (), None)
        raise ExecutionError(f"block {i} finished without reaching resid_mid")

    def take_turns(self, turns: Any) -> None:
        """Share the device through ``turns`` (a ``FairScheduler``): hand it on between steps,
        between the blocks of a long step, and inside them while others are waiting."""
        self.between_steps, self.between_blocks, self.contended = turns.between_steps, turns.yield_turn, turns.contended

    def _finish(self, layer: int, site: str, h: torch.Tensor, saved: dict, args: tuple, kwargs: dict,
                stop: str | None, watches: Sequence[str], on_watch: OnWatch | None) -> torch.Tensor:
        parts = self.parts[layer]

        def after(s: str, value: torch.Tensor, sv: dict) -> None:
            if s in watches:
                _watcher(on_watch)(layer, s, value)
            if s == stop:
                raise Paused(layer, s, value, args, kwargs, {k: sv[k] for k in ("resid_pre", *parts.needs(s))})

        def call_block(x: torch.Tensor) -> torch.Tensor:
            return self._block(layer, x, args, kwargs, stop, watches, on_watch)

        return finish_block(parts, site, h, saved, call_block, after)

    # ----- the step loop -------------------------------------------------------------
    def advance(self, run: Run, start: torch.Tensor | None) -> None:
        """Execute ``run`` until it pauses or ends. ``start``: continue its checkpoint from this.

        A one-shot ``run.target`` (step, point) — set by next_layer, next_step and rewind —
        is the only stop until it is reached. Conditional breakpoints are tested after their
        step and, where they hold, the step is replayed to pause in it (see conditional.py).
        """
        first = True
        while True:
            if not first:
                self.between_steps(run)
            first = False
            cp, step = run.checkpoint, run.step
            if run.target is not None:
                stops = [run.target[1]] if run.target[0] == step else []
            else:
                stops = [b.point for b in run.breakpoints if b.when is None and (b.step is None or b.step == step)]
                if run.forced_step == step:
                    stops += sorted(run.forced)
            test = StepTest.prepare(run, step, start, self.saes)
            user_watches = [b.point for b in run.watches if b.covers(step)] if run.watches else []
            watches = sorted({*user_watches, *test.norm_points}) if test else sorted(set(user_watches))
            record = self._recorder(run, step, user_watches, test) if watches else None

            try:
                if cp is not None:
                    start = cp.pending if start is None else start
                    here = Point.at(cp.layer, cp.site)
                    later = [p for p in stops + watches if p > here]
                    long = start.shape[0] * start.shape[1] >= SLICE_TOKENS
                    # a fork's graph replay cannot hand the device on: eager and split only while others wait
                    if run.parent is not None and not later and test is None and self.cuda_graphs and not (
                            long and self.contended()):
                        logits = self._continue_fork(run, cp, start)
                    else:
                        run.continued_by = "eager"
                        logits = self.continue_from(cp.layer, cp.site, start, cp.args, cp.kwargs, cp.saved,
                                                    stops, watches, record, turn=long)
                    run.checkpoint = None
                else:
                    ids = run.prompt_ids if step == 0 else run.token_ids[-1:]
                    x = torch.tensor([ids], dtype=torch.long, device=self.device)
                    if len(ids) >= SLICE_TOKENS and ORIGIN not in stops:
                        logits = self.sliced_forward(x, run.cache, stops, watches, record)
                    elif stops and not watches:  # an armed step: its traces stand, its pause returns
                        return self._pause(run, step, self._forward_standing(x, run.cache, min(stops)))
                    else:
                        logits = self.forward(x, run.cache, min(stops, default=None), watches, record)
            except Paused as p:
                return self._pause(run, step, p)
            used, start = start, None
            ended = self.take_tokens([run], logits)[0]
            if not logits_finite(run):  # never a token from NaN: the engine undoes this call
                self._untake(run)
                raise NonFiniteLogits(step, cp, used)
            if test is not None:
                held = test.held(run, step)
                if held:  # undo the step and run it again, stopping where the conditions held
                    run.checkpoint, start = test.undo(run)
                    run.forced, run.forced_step = set(held), step
                    continue
            if ended:
                run.target = None
                self.release_traces()
                if not self.keep_finished:
                    run.cache = None  # frees the device memory; tokens and logits stay
                return

    @staticmethod
    def _pause(run: Run, step: int, p: Paused) -> None:
        run.checkpoint = Checkpoint(p.layer, step, p.value, p.value, p.args, p.kwargs, p.site, p.saved)
        run.timings["forward_to_pause"] = p.capture_s  # the forward up to the pause, not a checkpoint's cost
        run.state = RunState.PAUSED
        if not (run.forced_step == step and Point.at(p.layer, p.site) in run.forced):
            run.held = None  # not a conditional pause: no condition to show
        run.last_point = (p.layer, p.site)
        if run.target is not None and run.target == (step, Point.at(p.layer, p.site)):
            run.target = None

    @staticmethod
    def _recorder(run: Run, step: int, user_watches: list[Point], test: StepTest | None) -> OnWatch:
        def record(layer: int, site: str, value: torch.Tensor) -> None:
            point = Point.at(layer, site)
            if point in user_watches:
                run.trajectory.record_watch(WatchHit(layer, step, site, value))
            if test is not None:
                test.record(point, value)
        return record

    def _continue_fork(self, run: Run, cp: Checkpoint, start: torch.Tensor) -> torch.Tensor:
        """A fork's continuation: eager, then captured as a CUDA graph and replayed (see graphs.py)."""
        slot = cp.graphs
        slot.forks += 1

        def tail(h: torch.Tensor, a: tuple, kw: dict) -> torch.Tensor:
            return self.continue_from(cp.layer, cp.site, h, a, kw, cp.saved)

        if slot.graph is not None:
            logits = slot.graph.replay(start).clone()
            slot.graph.copy_cache_into(run.cache)
            slot.replays += 1
            run.continued_by = "cuda-graph"
            return logits
        capture = slot.disabled is None and slot.forks > graphs.CAPTURE_AFTER
        before = kvcache.fork_cache(run.cache) if capture else None  # the eager run below writes run.cache
        logits = tail(start, cp.args, cp.kwargs)
        run.continued_by = "eager"
        if capture:
            try:
                first_written = cp.layer if cp.site == "resid_pre" else cp.layer + 1  # blocks whose KV it writes
                graph = graphs.TailGraph(tail, first_written, start, cp.args, cp.kwargs, run.cache, before)
                graph.replay(start)
                if graph.matches(logits, run.cache):
                    slot.graph = graph
                    run.continued_by = "eager (graph captured)"
                else:
                    slot.disabled = "graph replay differed from eager execution"
            except Exception as e:  # noqa: BLE001 - any capture failure keeps the eager path
                slot.disabled = f"capture failed: {type(e).__name__}: {e}"
        return logits

    def take_tokens(self, runs: Sequence[Run], logits: torch.Tensor) -> list[bool]:
        """Pick each run's token from its row of ``logits`` and append it; whether each run ended."""
        now = time.perf_counter()
        ended = []
        for run, token in zip(runs, pick_tokens(runs, logits)):
            run.trajectory.record_token(token, now)
            run.step += 1
            end = run.step >= run.max_new_tokens or token in self.eos_ids
            if end:
                run.state = RunState.DONE
            ended.append(end)
        return ended

    @staticmethod
    def _untake(run: Run) -> None:
        """Take back the token :meth:`take_tokens` just appended (and what it recorded with it)."""
        run.trajectory.drop_last_step(sampled=run.sampling.temperature > 0, kept_logits=run.record_logits)
        run.step -= 1
        run.state = RunState.RUNNING


__all__ = ["Paused", "Stepper", "TOP_K"]
