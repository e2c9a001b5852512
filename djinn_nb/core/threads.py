"""CPU threads of the model's work: how many, and how they wait.

Why: torch's CPU kernels run on an OpenMP pool whose idle threads busy-wait
(libgomp spins before it sleeps). On a quiet machine that saves a wake-up per
kernel; on a busy one — a 2-core laptop or CI runner with two other processes —
the spinning threads take the cores the working ones need, and a 12-token
generate of the embedded model was measured 8–25× slower. Waiting passively
(``OMP_WAIT_POLICY=PASSIVE``) cost 0.05 s of that generate on an idle 2-core
machine (0.61 → 0.66 s) and saved 0.6–0.9 s of ~2 s with two busy processes beside
it, where spinning runs took up to 7 s (``experiments/results/cpu-2core/threads.json``),
so it is the default: set when ``djinn_nb`` is imported, if torch is not loaded
yet (libgomp reads it once, when it loads) and the user has not chosen. One thread
was faster still for that small generate but slower on a long prompt pass, so the
thread count stays torch's.

Overrides: ``OMP_WAIT_POLICY=ACTIVE`` in the environment (a dedicated machine);
``DJINN_THREADS=N`` (torch's intra-op threads for the engine; default torch's own,
one per physical core). ``describe()`` says what is in effect, for ``client.info()``
and the client's card.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from ..errors import BadRequestError

WAIT_POLICY = "OMP_WAIT_POLICY"
THREADS = "DJINN_THREADS"

_torch_was_loaded_first = False  # torch imported before djinn_nb: its pool's policy was fixed already


def prefer_passive_waiting() -> None:
    """Make idle OpenMP threads sleep rather than spin, unless chosen otherwise or too late."""
    global _torch_was_loaded_first
    if "torch" in sys.modules:
        _torch_was_loaded_first = WAIT_POLICY not in os.environ
        return
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")


def thread_setting() -> int | None:
    """``DJINN_THREADS`` as a positive integer, or None when unset."""
    text = os.environ.get(THREADS, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise BadRequestError(f"{THREADS} must be a positive integer, got {text!r}"[:200])
    return int(text)


def apply_thread_setting() -> None:
    """Set torch's intra-op threads from ``DJINN_THREADS`` (the engine's loader calls this)."""
    n = thread_setting()
    if n is not None:
        import torch

        torch.set_num_threads(n)


def describe() -> dict[str, Any]:
    """How many threads torch's CPU kernels use, and how idle ones wait."""
    import torch

    policy = os.environ.get(WAIT_POLICY)
    if _torch_was_loaded_first:
        policy = "libgomp's default (spins, then sleeps): torch was imported before djinn_nb"
    return {"threads": torch.get_num_threads(), "omp_wait_policy": policy or "libgomp's default"}
