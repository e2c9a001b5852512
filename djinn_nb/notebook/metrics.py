"""Steering metrics: how much a scaled activation changes what the model says.

Pure functions on token ids and logits, plus :func:`steering_sweep`, which
measures them through the client API: one run paused at a breakpoint, an
unmodified fork as the baseline, and one fork per factor, each closed as soon
as its tokens and logits are read.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from .display import decode_text

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..client import Client

__all__ = ["token_change_rate", "kl_divergence", "relative_logit_change", "steering_sweep", "SWEEP_COLUMNS"]

SWEEP_COLUMNS = [
    "layer", "step", "factor", "token_change_rate", "kl", "logit_change",
    "fork_ms", "server_ms", "transport_ms", "text", "token_ids",
]


def token_change_rate(baseline: Sequence[int], other: Sequence[int]) -> float:
    """Fraction of positions whose token differs; positions only one sequence has count as changed.

    Positional, as the exp3 study defines it: a token inserted early shifts every later one.
    The product's "tokens changed" (slider, demo) aligns first: ``compare.tokens_changed``.
    """
    n = max(len(baseline), len(other))
    if n == 0:
        return 0.0
    same = sum(1 for a, b in zip(baseline, other) if a == b)
    return (n - same) / n


def kl_divergence(base_logits: torch.Tensor, other_logits: torch.Tensor) -> float:
    """KL(base || other) of the next-token distributions given by two logit vectors, in nats."""
    p = torch.log_softmax(base_logits.double().flatten(), -1)
    q = torch.log_softmax(other_logits.double().flatten(), -1)
    return float(torch.sum(p.exp() * (p - q)).clamp_min(0.0))


def relative_logit_change(base_logits: torch.Tensor, other_logits: torch.Tensor) -> float:
    """``||other - base|| / ||base||`` of two logit vectors."""
    b = base_logits.double().flatten()
    return float((other_logits.double().flatten() - b).norm() / b.norm().clamp_min(1e-12))


def steering_sweep(
    client: "Client",
    prompt: str | Sequence[int],
    layers: int | Iterable[int],
    factors: Iterable[float],
    max_new_tokens: int = 12,
    step: int = 0,
) -> "pd.DataFrame":
    """Scale the output of each layer in ``layers`` at ``step`` by each factor; measure the effect.

    For every layer: one run paused at (layer, step) with ``record_logits=True``,
    an unmodified fork as the baseline, then one fork per factor. Returns one row
    per (layer, factor) with the columns of ``SWEEP_COLUMNS``: ``token_change_rate``
    of the continuation, ``kl`` and ``logit_change`` of the next-token distribution
    at the steered step, ``fork_ms`` (client wall time of the fork), ``server_ms``
    (its execution on the server) and ``transport_ms`` (the rest). Every run the
    sweep starts is closed before it returns.
    """
    import pandas as pd

    rows = []
    for layer in [layers] if isinstance(layers, int) else list(layers):
        run = client.generate(
            prompt, max_new_tokens=max_new_tokens, breakpoints=[(layer, step)], record_logits=True
        )
        try:
            if not run.paused:
                raise ValueError(f"the run ended before reaching layer {layer} at step {step}")
            with run.fork(breakpoints=[]) as base:
                base_ids, base_logits = base.token_ids, base.logits(step)
            for factor in factors:
                t0 = time.perf_counter()
                fork = run.fork(scale=float(factor), breakpoints=[])
                wall = (time.perf_counter() - t0) * 1e3
                with fork:
                    server = fork.timings_ms.get("execute", 0.0) + fork.timings_ms.get("fork_copy", 0.0)
                    logits = fork.logits(step)
                    ids = fork.token_ids
                    rows.append(
                        {
                            "layer": layer,
                            "step": step,
                            "factor": float(factor),
                            "token_change_rate": token_change_rate(base_ids, ids),
                            "kl": kl_divergence(base_logits, logits),
                            "logit_change": relative_logit_change(base_logits, logits),
                            "fork_ms": wall,
                            "server_ms": server,
                            "transport_ms": max(0.0, wall - server),
                            "text": decode_text(client, ids),
                            "token_ids": ids,
                        }
                    )
        finally:
            run.close()
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)

