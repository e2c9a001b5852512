"""What the engine gives its collaborators (``Forks``, ``Navigator``): a narrow, typed interface.

Why: forks and the debugger's navigation were mixins of ``Engine``, typed as the engine itself,
reaching into a dozen of its members, private ones included, both ways; every change to the
engine could break them unseen, and a type checker could not follow. Each is now a class
given a ``RunHost``: the runs by id, the checks every call makes, and the one way to run a
run — nothing else of the engine. ``Engine`` is the only implementation.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ContextManager, Iterable, NoReturn, Protocol

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .residency import Residency
    from .runs import Checkpoint, Run
    from .specs import Breakpoint
    from .stepping import Stepper


class RunHost(Protocol):
    device: torch.device
    residency: "Residency"
    stepper: "Stepper"

    @property
    def num_layers(self) -> int: ...

    def get(self, run_id: str, owner: str = "") -> "Run":
        """The run ``run_id`` of ``owner`` (an ``UnknownRunError`` otherwise)."""

    def paused(self, run: "Run") -> "Checkpoint":
        """The run's checkpoint; a ``RunStateError`` unless it is paused."""

    def breakpoints(self, specs: Iterable[Any] | None, max_new_tokens: int) -> tuple["Breakpoint", ...]:
        """Breakpoints (or watches) parsed and checked against this model."""

    def check_site(self, layer: int, site: str) -> None:
        """A ``BreakpointError`` unless block ``layer`` has ``site``, exactly."""

    def check_positions(self, prompt_len: int, max_new_tokens: int) -> None:
        """A ``BadRequestError`` if the run would pass the model's positions."""

    def new_run_id(self, owner: str = "") -> str: ...

    def adopt(self, run: "Run") -> None:
        """Register a new run (a fork, a rewind) so that its owner can reach it."""

    def discard(self, run: "Run") -> None:
        """Close a run a failed call made (its caller never got its id), if it is still registered."""

    def new_cache(self) -> Any:
        """An empty KV cache for this model."""

    def advance(self, run: "Run", start: torch.Tensor | None) -> None:
        """Run ``run`` (its lock held) until it pauses or ends; ``start``: its checkpoint's edited value."""

    def device_turn(self) -> ContextManager[Any]:
        """The device, exclusively (for work that is not one run's step, e.g. a batch of forks)."""

    def fail(self, run: "Run", message: str) -> NoReturn:
        """Mark ``run`` failed, free it, and raise an ``ExecutionError``."""


__all__ = ["RunHost"]
