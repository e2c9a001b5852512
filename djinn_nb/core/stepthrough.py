"""The per-step batch form: one edit applied at a run's pause in each of the next n steps, on the server.

Why: a researcher who pauses at every step to make the same edit (steering each new token,
ablating a head for a whole continuation) pays one round trip per step through the client —
over a real network that dominates a step. ``step_through`` makes the same pauses and the same
edits without leaving the server: at the paused (layer, site) it writes the edit into the
pending activation, goes on to the same (layer, site) of the next step (the run's breakpoints
do not stop it on the way, as with ``next_step``), and repeats; after ``steps`` edits the run
is paused at the same place ``steps`` steps later (or has ended). Each step is exactly what a
client's ``edit`` + ``next_step`` would have done, so the tokens equal a torch hook applying
the edit at that site in each of those steps.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import BadRequestError
from .specs import Point

if TYPE_CHECKING:
    from .forking import Forks
    from .host import RunHost
    from .runs import Run
    from .specs import Edit


def step_through(host: "RunHost", forks: "Forks", run_id: str, steps: int, edit: "Edit | None",
                 owner: str = "") -> "Run":
    """Apply ``edit`` (None: none) at the run's pause and continue to the same site of the next
    step, ``steps`` times; the run is left paused there, or finished. A bad edit changes nothing."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise BadRequestError(f"steps must be a positive integer, not {steps!r}"[:200])
    patch = forks.patch_source(edit, owner)
    run = host.get(run_id, owner)
    with run.lock:
        host.paused(run)  # a RunStateError unless it is paused now
        for _ in range(steps):
            if not run.paused:
                break  # it ended: the last step was the run's last
            cp = host.paused(run)
            host.residency.restore(run)
            start = forks.edited(cp, edit, patch) if edit is not None else cp.pending  # validated before anything runs
            run.target = (cp.step + 1, Point.at(cp.layer, cp.site))
            host.advance(run, start)
    return run


__all__ = ["step_through"]
