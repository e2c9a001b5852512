"""A call's request made the engine's: an ``EditRequest`` an ``Edit``; breakpoints' feature conditions checked.

Why a module of its own: generate, resume, fork, fork_many, edit and step_through all take
these, and check them the same way before anything changes. An edit's tensors are decoded, or
taken from the side channel (a :class:`~djinn_nb.serving.parts.Tensors`); its ``clamp`` names an
SAE its caller loaded, and is admitted on the SAE's working bytes. A breakpoint's condition that
reads ``feature(sae, n)`` must name an SAE the caller loaded, at the breakpoint's own place, and a
feature it has. :class:`Requests` is given the caller (a :class:`~djinn_nb.serving.parts.Caller`)
and the tensors; it is the other call groups' :class:`~djinn_nb.serving.parts.Requests`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..conditions import feature_terms
from ..core.features import Clamp, check_feature, check_place
from ..core.saes import SaeRegistry
from ..core.specs import Edit, parse_breakpoint
from ..errors import DjinnError
from ..wire.messages import EditRequest
from .parts import Caller, Tensors

if TYPE_CHECKING:  # pragma: no cover
    from ..core.engine import Engine

__all__ = ["Requests"]


class Requests:
    """``edit`` and ``check_features`` for the calls that take an edit or breakpoints."""

    def __init__(self, caller: Caller, tensors: Tensors):
        self._caller = caller
        self._tensors = tensors

    @property
    def _engine(self) -> Engine:
        return self._caller.engine

    @property
    def _saes(self) -> SaeRegistry:
        return self._engine.stepper.saes

    def edit(self, req: EditRequest, act: Any, add: Any) -> Edit:
        """The engine's ``Edit`` for an ``EditRequest`` and the bytes sent beside it (``act``, ``add``)."""
        return Edit(
            activation=self._tensors.take(req.activation, act, "activation"),
            scale=req.scale,
            add=self._tensors.take(req.add, add, "add"),
            original=req.original,
            heads=None if req.heads is None else tuple(req.heads),
            patch_from=req.patch_from,
            positions=None if req.positions is None else tuple(req.positions),
            clamp=self.clamp(req.clamp),
        )

    def clamp(self, clamp: dict[str, Any] | None) -> Clamp | None:
        """An edit's ``clamp`` resolved to the caller's SAE, its features checked."""
        if clamp is None:
            return None
        owner = self._caller.who()
        sae = self._saes.get(owner, clamp["sae"])
        self._caller.check_bytes(owner, adding=sae.work_bytes(self._engine.max_positions or 1))  # at most every position
        return Clamp.of(sae, clamp["features"])

    def check_features(self, breakpoints: Any) -> None:
        """Refuse, before a run is made, a condition naming an SAE the caller has not loaded, at
        another place than the breakpoint's, or a feature it does not have. Breakpoints that do
        not parse are left to the engine, which says why."""
        if not isinstance(breakpoints, list):
            return
        owner = self._caller.who()
        for spec in breakpoints:
            try:
                bp = parse_breakpoint(spec)
            except (DjinnError, TypeError, ValueError):
                continue
            cond = bp.condition
            for sae_id, n in sorted(feature_terms(cond)) if cond is not None else ():
                sae = self._saes.get(owner, sae_id)
                check_place(sae, bp.layer, bp.site, f"the breakpoint reading feature({sae_id}, {n})")
                check_feature(sae, n)
                # each step encodes that step's positions (the prompt's at step 0): at most every position
                self._caller.check_bytes(owner, adding=sae.work_bytes(self._engine.max_positions or 1))
