"""A debugger's controls on runs: step to the next layer or step, rewind to an earlier step, history.

``next_layer``/``next_step`` give a paused run a one-shot stop (``Run.target``)
that overrides its breakpoints until reached; they still apply afterwards.
``rewind`` makes a new run paused at (layer, site) of an earlier step of any
run that has reached it: the KV cache is the source's, cropped to the length
it had before that step (views of the same tensors: HF's dynamic layers never
write in place, so nothing is copied), and only that step, up to the layer, is
computed again — exactly what a fresh breakpoint there would compute. That is
why finished runs keep their KV cache until closed or expired (counted in
``bytes_held`` and by the paused-bytes budget).

:class:`Navigator` is given the engine as a :class:`~djinn_nb.core.host.RunHost` and uses
nothing else of it.
"""
from __future__ import annotations

from typing import NamedTuple

from ..errors import BadRequestError, BreakpointError, RunStateError
from ..states import RunState
from .host import RunHost
from .runs import Run
from .sites import DEFAULT_SITE
from .specs import Point


class TokenRecord(NamedTuple):
    """One generated token as :meth:`Navigator.history` reads it (serving makes it a ``HistoryRecord``)."""

    step: int
    token_id: int
    topk: list[tuple[int, float]]  # (token id, probability) when it was picked
    entropy: float  # nats
    time_s: float | None  # after the run's first timed token; None for tokens a fork or rewind took over


class Navigator:
    """``next_layer``, ``next_step``, ``rewind`` and ``history``, over the runs of a :class:`RunHost`."""

    def __init__(self, host: RunHost):
        self._host = host

    def next_layer(self, run_id: str, owner: str = "") -> Run:
        """Pause at the next block's output (``resid_post`` of layer + 1) in the same step."""
        host = self._host
        run = host.get(run_id, owner)
        with run.lock:
            cp = host.paused(run)
            if cp.layer + 1 >= host.num_layers:
                raise BreakpointError(
                    f"run {run.id} is paused at the last layer ({cp.layer}): use next_step() or resume()"
                )
            host.check_site(cp.layer + 1, "resid_post")
            host.residency.restore(run)
            run.target = (cp.step, Point.at(cp.layer + 1, "resid_post"))
            host.advance(run, None)
        return run

    def next_step(self, run_id: str, owner: str = "") -> Run:
        """Pause at the same layer and site one step later (or run to the end if there is none)."""
        host = self._host
        run = host.get(run_id, owner)
        with run.lock:
            cp = host.paused(run)
            host.residency.restore(run)
            run.target = (cp.step + 1, Point.at(cp.layer, cp.site))
            host.advance(run, None)
        return run

    def rewind(self, run_id: str, step: int, layer: int | None = None, site: str | None = None,
               owner: str = "") -> Run:
        """A new run paused at (``layer``, ``site``) of ``step`` of this run, which is left as it is.

        Defaults: with neither ``layer`` nor ``site``, the run's current (or, finished, its
        last) pause's; with ``layer`` alone, ``site`` is ``resid_post`` (the block's output,
        as a breakpoint's default).
        """
        host = self._host
        src = host.get(run_id, owner)
        with src.lock:
            if src.state not in (RunState.PAUSED, RunState.DONE) or src.cache is None:
                raise RunStateError(f"run {src.id} is {src.state}: only a paused or finished run can be rewound")
            reached = src.step + 1 if src.paused else src.step  # steps executed, or under way
            if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < reached:
                raise BreakpointError(f"run {src.id} has reached steps 0..{reached - 1}, not {step!r}"[:200])
            if layer is not None and site is None:
                site = DEFAULT_SITE
            elif layer is None:
                if src.last_point is None:
                    raise BreakpointError(f"run {src.id} has never paused: pass layer= (and site=) to rewind")
                layer = src.last_point[0]
                site = src.last_point[1] if site is None else site
            bp = host.breakpoints([(layer, step, site)], src.max_new_tokens)[0]
            host.residency.restore(src)
            run = self._rewound(src, step, owner)
        host.adopt(run)
        with run.lock:
            run.target = (step, bp.point)
            host.advance(run, None)
        return run

    def history(self, run_id: str, owner: str = "") -> list[TokenRecord]:
        """One record per generated token: step, token_id, topk [(id, prob)], entropy (nats), and
        time_s: when it was picked, in seconds after this run's first timed token (None for the
        tokens a fork or rewind took over from its source, which this run did not time)."""
        import math

        run = self._host.get(run_id, owner)
        with run.lock:
            times = run.token_times
            untimed = len(run.token_ids) - len(times)
            return [
                TokenRecord(i, t, [(int(j), math.exp(lp)) for j, lp in top], h,
                            None if i < untimed else round(times[i - untimed] - times[0], 7))
                for i, (t, top, h) in enumerate(zip(run.token_ids, run.topk, run.entropies))
            ]

    # ----- helpers ----------------------------------------------------------------
    def _rewound(self, src: Run, step: int, owner: str) -> Run:
        """A copy of ``src`` as it was before ``step``: tokens, records and the cropped KV cache."""
        import torch
        from transformers.cache_utils import DynamicLayer

        from . import kvcache

        if step == 0:
            cache = self._host.new_cache()
        else:
            length = len(src.prompt_ids) + step - 1  # the cache before step k holds the prompt and k-1 tokens
            cache = kvcache.fork_cache(src.cache)
            odd = [i for i, layer in enumerate(cache.layers) if type(layer) is not DynamicLayer]
            if odd:
                raise BadRequestError(
                    f"rewind crops a full KV cache; this model's layer {odd[0]} keeps a "
                    f"{type(cache.layers[odd[0]]).__name__} (a sliding window or a state), which cannot be cropped back"
                )
            for layer in cache.layers:
                for name in ("keys", "values"):
                    t = getattr(layer, name, None)
                    if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-2] > length:
                        setattr(layer, name, t[..., :length, :])
        gen = None
        if src.generator is not None:
            gen = torch.Generator(device=self._host.device)
            gen.set_state(src.gen_states[step] if step < len(src.gen_states) else src.generator.get_state())
        return Run(
            id=self._host.new_run_id(owner),
            owner=owner,
            prompt_ids=list(src.prompt_ids),
            max_new_tokens=src.max_new_tokens,
            breakpoints=src.breakpoints,
            watches=src.watches,
            trajectory=src.trajectory.cropped(step),
            sampling=src.sampling,
            generator=gen,
            cache=cache,
            record_logits=src.record_logits,
            step=step,
            parent=src.id,
        )


__all__ = ["Navigator"]
