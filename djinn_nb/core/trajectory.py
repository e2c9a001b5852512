"""A run's history: what each finished step recorded, and the one way to take steps back.

Why: a step records its token, the top-k and entropy of the distribution it was chosen
from, when it was picked, the sampler's state before it, its logits (with
``record_logits``) and the watch hits on its way. These lists were appended where a step
picks its token, popped by the conditional breakpoints' undo, cut by the NaN guard's
roll-back, copied by forks and cut again by rewind — each place by hand, each list by
name, so a new record (or a new way back) had to find all of them. Here they live
together: :meth:`Trajectory.mark` and :meth:`Trajectory.undo` take any number of steps
back (the conditional replay and the NaN guard alike), :meth:`Trajectory.forked` and
:meth:`Trajectory.cropped` make a fork's and a rewind's history.

The KV cache is not here: it lives on the device and has its own ways back
(``kvcache.CacheMark``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch


class WatchHit(NamedTuple):
    """One recorded activation: block ``layer``'s ``site`` at generation step ``step``."""

    layer: int
    step: int
    site: str
    tensor: torch.Tensor


class Mark(NamedTuple):
    """Where a trajectory was: each record's length, and the last logits then."""

    lengths: tuple[int, int, int, int, int, int, int]
    last_logits: torch.Tensor | None


@dataclass(eq=False)
class Trajectory:
    """Per-step records of one run. ``token_ids[i]`` is step i's token; ``topk[i]`` (id,
    log-probability) and ``entropies[i]`` (nats) describe the distribution it was chosen from;
    ``token_times`` are the times of the tokens this run picked itself (a fork's or rewind's
    inherited tokens are untimed, so it may be shorter); ``gen_states[i]`` the sampler's state
    before step i (sampled runs only); ``logits[i]`` step i's logits (``record_logits`` only)."""

    token_ids: list[int] = field(default_factory=list)
    topk: list[list[tuple[int, float]]] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    gen_states: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    watch_log: list[WatchHit] = field(default_factory=list)
    last_logits: torch.Tensor | None = None  # the latest step's logits, recorded or not

    # ----- a step's records -------------------------------------------------------
    def record_distribution(self, logits: torch.Tensor, topk: list[tuple[int, float]], entropy: float,
                            keep_logits: bool) -> None:
        """The distribution a step's token is chosen from (before the token is known)."""
        self.last_logits = logits
        if keep_logits:
            self.logits.append(logits)
        self.topk.append(topk)
        self.entropies.append(entropy)

    def record_token(self, token: int, when: float) -> None:
        self.token_times.append(when)
        self.token_ids.append(token)

    def record_generator(self, state: torch.Tensor) -> None:
        """The sampler's state before a sampled step (what rewinding to the step restores)."""
        self.gen_states.append(state)

    def record_watch(self, hit: WatchHit) -> None:
        self.watch_log.append(hit)

    # ----- going back ---------------------------------------------------------------
    def mark(self) -> Mark:
        return Mark((len(self.token_ids), len(self.topk), len(self.entropies), len(self.token_times),
                     len(self.gen_states), len(self.logits), len(self.watch_log)), self.last_logits)

    def undo(self, mark: Mark) -> None:
        """Back to where :meth:`mark` was taken: every record after it dropped."""
        n_ids, n_topk, n_ent, n_times, n_gen, n_logits, n_watch = mark.lengths
        del self.token_ids[n_ids:]
        del self.topk[n_topk:]
        del self.entropies[n_ent:]
        del self.token_times[n_times:]
        del self.gen_states[n_gen:]
        del self.logits[n_logits:]
        del self.watch_log[n_watch:]
        self.last_logits = mark.last_logits

    def drop_last_step(self, sampled: bool, kept_logits: bool) -> None:
        """Take back the step just recorded (no mark needed on the hot path: one of each record,
        the sampler's state if ``sampled``, the logits if ``kept_logits``)."""
        for records in (self.token_ids, self.topk, self.entropies, self.token_times):
            records.pop()
        if sampled:
            self.gen_states.pop()
        if kept_logits:
            self.logits.pop()

    # ----- new runs from this one -----------------------------------------------------
    def forked(self) -> "Trajectory":
        """A fork's history: this one's records (untimed: the fork did not pick those tokens)."""
        return Trajectory(list(self.token_ids), list(self.topk), list(self.entropies), [], list(self.gen_states),
                          list(self.logits), list(self.watch_log))

    def cropped(self, step: int) -> "Trajectory":
        """A rewind's history: the records of steps before ``step`` (untimed), and the logits of
        step - 1 as the latest where they were recorded."""
        return Trajectory(self.token_ids[:step], self.topk[:step], self.entropies[:step], [],
                          self.gen_states[:step], self.logits[:step], [h for h in self.watch_log if h.step < step],
                          self.logits[step - 1] if 0 < step <= len(self.logits) else None)

    # ----- tensors ------------------------------------------------------------------
    def drop_tensors(self) -> None:
        """Free the device tensors (a closed run keeps its tokens and their top-k)."""
        self.logits = []
        self.watch_log = []
        self.last_logits = None

    def map_watch_tensors(self, fn: Any) -> None:
        """Replace each watch hit's tensor by ``fn(tensor)`` (offload and restore)."""
        self.watch_log = [hit._replace(tensor=fn(hit.tensor)) for hit in self.watch_log]


__all__ = ["Mark", "Trajectory", "WatchHit"]
