"""The experiment's metrics, as defined in the README: token accuracy and the steering effect.

The steering measures (token change rate, KL of the next-token distributions, relative
logit change) are the package's own, :mod:`djinn_nb.notebook.metrics`, so the notebooks'
sweeps and this experiment report the same numbers. Only what the package does not
define lives here: token accuracy (one minus the change rate against the unpaused run),
the first diverging position, and the study's per-edit summary.
"""
from __future__ import annotations

from typing import Sequence

import torch

from djinn_nb.notebook.metrics import kl_divergence, relative_logit_change, token_change_rate

__all__ = ["token_accuracy", "token_change_rate", "first_divergence", "kl_divergence",
           "relative_logit_change", "steering_effect"]


def token_accuracy(got: Sequence[int], reference: Sequence[int]) -> float:
    """Fraction of positions where ``got`` equals ``reference``; a missing token counts as wrong."""
    return 1.0 - token_change_rate(reference, got)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where two token sequences differ (None if identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def steering_effect(
    unmodified_ids: Sequence[int],
    steered_ids: Sequence[int],
    unmodified_logits: torch.Tensor,
    steered_logits: torch.Tensor,
) -> dict[str, object]:
    """The steering metrics of one edit; logits are those of the first step after the edit."""
    return {
        "output_changed": list(unmodified_ids) != list(steered_ids),
        "token_change_rate": token_change_rate(unmodified_ids, steered_ids),
        "first_changed_position": first_divergence(unmodified_ids, steered_ids),
        "kl_next_token": kl_divergence(unmodified_logits, steered_logits),
        "relative_logit_change": relative_logit_change(unmodified_logits, steered_logits),
        "top1_changed_at_edit_step": int(unmodified_logits.argmax()) != int(steered_logits.argmax()),
    }
