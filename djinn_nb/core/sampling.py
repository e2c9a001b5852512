"""Picking a step's tokens: greedy argmax or a seeded sample per run, with what the step records.

Why apart from the step loop: how a token is chosen (temperature, top-k, the overflow
fallbacks, NaN rows left for the NaN guard) is its own subject, and every path that ends a
step (one run, a batch of forks) picks through this one function. It reads the device once
per batch: the tokens, their top-k and the distributions' entropies in one transfer.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .runs import Run

#: how many of a step's most likely tokens are recorded (``Run.topk``)
TOP_K = 5


def pick_tokens(runs: Sequence[Run], logits: torch.Tensor) -> list[int]:
    """Each run's next token from its row of ``logits`` (batch, vocab), with its top-k and the
    distribution's entropy recorded, all read from the device in one transfer."""
    lp = logits.float().log_softmax(-1)
    k = min(TOP_K, logits.shape[-1])
    vals, idx = torch.topk(lp, k, dim=-1)
    entropy = torch.special.entr(lp.exp()).sum(-1)
    choices: list[torch.Tensor | None] = []
    for i, run in enumerate(runs):
        s = run.sampling
        if s.temperature == 0:
            choices.append(None)
            continue
        assert run.generator is not None, "a sampling run has its generator (Engine.generate, forks)"
        run.trajectory.record_generator(run.generator.get_state())  # what rewinding to this step restores
        row = logits[i].float()
        scores = row / s.temperature
        # a temperature so small that logit/temperature overflows (5e-324 is finite and > 0),
        # to +inf or every score to -inf: the same ranking from the logits less their max (no
        # device read; with a finite top score the plain quotient stays: seeded samples unchanged)
        # (at least float32's least normal number: CUDA divides by a scalar as a multiplication by
        # its reciprocal, which overflows for anything smaller and would make the top score NaN)
        shifted = (row - row.amax()) / max(s.temperature, 2.0**-126)
        scores = torch.where(torch.isfinite(scores.amax()), scores, shifted)
        if s.top_k:
            kth = torch.topk(scores, min(s.top_k, scores.shape[-1])).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        # NaN logits (an edit's overflow) give NaN probabilities: their token is refused just
        # after (logits_finite), so multinomial must not raise first (on CUDA: a device assert)
        probs = torch.softmax(scores, dim=-1).nan_to_num(nan=1.0)
        choices.append(torch.multinomial(probs, 1, generator=run.generator).reshape(()))
    choice = torch.argmax(logits, dim=-1)
    if any(c is not None for c in choices):
        choice = torch.stack([choice[i] if c is None else c for i, c in enumerate(choices)])
    # float64 holds every token id exactly; one transfer instead of a sync per value
    rows = torch.cat([choice[:, None].double(), idx.double(), vals.double(), entropy[:, None].double()], 1).tolist()
    for i, (run, row) in enumerate(zip(runs, rows)):
        run.trajectory.record_distribution(logits[i], [(int(t), v) for t, v in zip(row[1 : 1 + k], row[1 + k : 1 + 2 * k])],
                                           row[-1], run.record_logits)
    return [int(row[0]) for row in rows]


__all__ = ["TOP_K", "pick_tokens"]
