"""The experiment's metrics, as defined in the README: token accuracy and the steering effect."""
from __future__ import annotations

from typing import Sequence

import torch


def token_accuracy(got: Sequence[int], reference: Sequence[int]) -> float:
    """Fraction of positions where ``got`` equals ``reference``; a missing token counts as wrong."""
    n = max(len(got), len(reference))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(got, reference)) / n


def token_change_rate(steered: Sequence[int], unmodified: Sequence[int]) -> float:
    """Fraction of generated positions whose token the steering changed."""
    return 1.0 - token_accuracy(steered, unmodified)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where two token sequences differ (None if identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def kl_divergence(reference_logits: torch.Tensor, other_logits: torch.Tensor) -> float:
    """KL(P_reference || P_other) in nats of the next-token distributions, computed in float64."""
    p = reference_logits.double().log_softmax(-1)
    q = other_logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def relative_logit_change(reference_logits: torch.Tensor, other_logits: torch.Tensor) -> float:
    """||other - reference||_2 / ||reference||_2 of the next-token logits."""
    ref = reference_logits.double()
    return float((other_logits.double() - ref).norm() / ref.norm())


def steering_effect(
    unmodified_ids: Sequence[int],
    steered_ids: Sequence[int],
    unmodified_logits: torch.Tensor,
    steered_logits: torch.Tensor,
) -> dict[str, object]:
    """The steering metrics of one edit; logits are those of the first step after the edit."""
    return {
        "output_changed": list(unmodified_ids) != list(steered_ids),
        "token_change_rate": token_change_rate(steered_ids, unmodified_ids),
        "first_changed_position": first_divergence(unmodified_ids, steered_ids),
        "kl_next_token": kl_divergence(unmodified_logits, steered_logits),
        "relative_logit_change": relative_logit_change(unmodified_logits, steered_logits),
        "top1_changed_at_edit_step": int(unmodified_logits.argmax()) != int(steered_logits.argmax()),
    }
