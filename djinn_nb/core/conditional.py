"""Conditional breakpoints: test a step's output on the server, and replay the step to pause in it.

A breakpoint with ``when`` cannot know before a step runs whether it should stop
in it: its terms (``top1_prob``, ``entropy``, ``token``) are about the step's
output. So the step runs unpaused (with a watch where ``norm`` or a ``feature`` is needed), the
condition is evaluated on numbers already read back with the token, and only
if it holds is the step undone — the token, its top-k and entropy, the
generator's state, the watch hits (``trajectory.Mark``), and the KV cache
(``kvcache.CacheMark``: each layer's attributes put back as they were, sharing
every tensor, since HF's dynamic layers never write in place; layers that do are
deep-copied) — and run again with the breakpoints that held as ordinary
stops. The replay computes exactly what the first run computed, so the pause
shows what an unconditional breakpoint at that step would. A step whose
conditions were tested is not tested again when it is resumed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..conditions import evaluate, feature_terms, terms_of
from ..states import RunState
from . import kvcache
from .saes import SAE, SaeRegistry
from .runs import Checkpoint, Run
from .trajectory import Mark
from .specs import Breakpoint, Point


@dataclass
class StepTest:
    """The conditional breakpoints of one step, and what undoing the step needs."""

    breakpoints: list[Breakpoint]
    norm_points: list[Point]  # the points whose value a condition reads (a norm, an SAE's features)
    cache: kvcache.CacheMark
    before: Mark  # the run's records before the step
    generator_state: torch.Tensor | None
    checkpoint: Checkpoint | None
    start: torch.Tensor | None
    norms: dict[Point, torch.Tensor] = field(default_factory=dict)
    #: per point, the (term key, SAE, feature) its conditions read, and their values once recorded
    features: dict[Point, list[tuple[str, SAE, int]]] = field(default_factory=dict)
    feature_values: dict[Point, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def prepare(cls, run: Run, step: int, start: torch.Tensor | None,
                saes: SaeRegistry | None = None) -> "StepTest | None":
        """The step's test, or None when no conditional breakpoint is left to test in it."""
        if run.target is not None or run.checked_step == step:
            return None
        cp = run.checkpoint
        here = Point.at(cp.layer, cp.site) if cp is not None else None
        bps = [b for b in run.breakpoints if b.when is not None and b.covers(step)
               and (here is None or b.point > here)]  # a point already passed in this step cannot be revisited
        if not bps:
            return None
        features: dict[Point, list[tuple[str, SAE, int]]] = {}
        for b in bps:
            for sae_id, n in sorted(feature_terms(_condition(b))):
                if saes is None:
                    raise ValueError("a feature condition is tested with the engine's SAEs")
                features.setdefault(b.point, []).append((f"feature({sae_id},{n})", saes.get(run.owner, sae_id), n))
        norm_points = sorted({b.point for b in bps if "norm" in terms_of(_condition(b))} | set(features))
        gen = run.generator.get_state() if run.generator is not None else None
        return cls(bps, norm_points, kvcache.CacheMark(run.cache), run.trajectory.mark(), gen, cp, start,
                   features=features)

    def record(self, point: Point, value: torch.Tensor) -> None:
        if point in self.norm_points:
            self.norms[point] = value.detach().float().flatten(2).norm(dim=-1).amax()  # z: heads × head_dim
        encoded: dict[int, torch.Tensor] = {}  # each SAE encodes the value once
        for key, sae, n in self.features.get(point, ()):
            acts = encoded.get(id(sae))
            if acts is None:
                acts = encoded[id(sae)] = sae.encode(value.detach())
            self.feature_values.setdefault(point, {})[key] = acts[..., n].amax()

    def held(self, run: Run, step: int) -> list[Point]:
        """The points of the breakpoints whose condition the finished step meets."""
        run.checked_step = step
        values: dict[str, Any] = {
            "top1_prob": math.exp(run.topk[-1][0][1]),
            "entropy": run.entropies[-1],
            "token": run.token_ids[-1],
            "step": step,
        }
        norms = {p: float(v) for p, v in self.norms.items()}  # one read per point, only where asked
        feats = {p: {k: float(v) for k, v in vs.items()} for p, vs in self.feature_values.items()}
        held, points = [], set()
        for b in self.breakpoints:
            these = {**values, "norm": norms.get(b.point, math.nan), **feats.get(b.point, {})}
            cond = _condition(b)
            if evaluate(cond, these):
                points.add(b.point)
                held.append({"layer": b.layer, "site": b.site, "when": cond,
                             "values": {t: these[t] for t in sorted(terms_of(cond))}})
        run.held = {"step": step, "conditions": held} if held else None  # what the run card shows at the pause
        return sorted(points)

    def undo(self, run: Run) -> tuple[Checkpoint | None, torch.Tensor | None]:
        """Put the run back as it was before the step; returns what the step started from."""
        run.trajectory.undo(self.before)
        run.step -= 1
        run.state = RunState.RUNNING
        self.cache.restore(run.cache)
        if self.generator_state is not None:
            assert run.generator is not None, "the state was read from the run's generator (prepare)"
            run.generator.set_state(self.generator_state)
        return self.checkpoint, self.start


def _condition(b: Breakpoint) -> dict[str, Any]:
    """A conditional breakpoint's condition tree (a step test holds only breakpoints with one)."""
    cond = b.condition
    if cond is None:
        raise ValueError(f"breakpoint {b} has no condition")
    return cond
