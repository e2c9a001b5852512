"""An SAE's features where a run is: read at a pause, clamped in an edit, tested in a condition.

Why a module of its own: ``saes.py`` is the SAE (files, arithmetic, registry); this is how
the debugger uses one, and it must check the same thing everywhere — that the SAE belongs to
the place the run is (its layer and site) — before it computes anything.

A clamp sets chosen features to a value and writes back ``h + (decode(f') - decode(f))``:
the SAE's error term (``h - decode(f)``) kept, as SAELens's hooked SAEs do with
``use_error_term``, and a position (or a feature) the clamp leaves as it was comes out as
``h`` exactly (its difference is exactly 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..errors import SaeError
from .saes import SAE

if TYPE_CHECKING:
    from .host import RunHost

__all__ = ["Clamp", "check_place", "read_features", "check_feature", "MAX_K", "MAX_IDS", "MAX_CLAMPED"]

MAX_K = 1000
MAX_IDS = 4096
MAX_CLAMPED = 4096


def check_place(sae: SAE, layer: int, site: str, what: str) -> None:
    """Refuse an SAE at a place it was not trained for (another layer or site)."""
    if (sae.layer, sae.site) != (layer, site):
        raise SaeError(f"SAE {sae.id} reads layer {sae.layer} {sae.site}; {what} is at layer {layer} {site}")


def check_feature(sae: SAE, feature: Any) -> int:
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < sae.d_sae:
        raise SaeError(f"feature {feature!r} is not one of SAE {sae.id}'s features 0..{sae.d_sae - 1}"[:200])
    return feature


@dataclass(frozen=True)
class Clamp:
    """Set ``features`` (id -> value) of ``sae``'s encoding, at ``positions`` (None: all)."""

    sae: SAE
    features: tuple[tuple[int, float], ...]

    @classmethod
    def of(cls, sae: SAE, features: Any) -> "Clamp":
        """From ``[[feature, value], ...]`` (the wire's form), checked."""
        if not isinstance(features, (list, tuple)) or not features or len(features) > MAX_CLAMPED:
            raise SaeError(f"a clamp sets 1 to {MAX_CLAMPED} features: [[feature, value], ...]")
        out: dict[int, float] = {}
        for pair in features:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise SaeError("a clamp's features are [feature, value] pairs")
            f, v = check_feature(sae, pair[0]), pair[1]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SaeError(f"feature {f}'s clamped value must be a finite number, got {v!r}"[:200])
            if f in out:
                raise SaeError(f"feature {f} is clamped twice")
            out[f] = float(v)
        return cls(sae, tuple(sorted(out.items())))

    def apply(self, h: torch.Tensor, layer: int, site: str, positions: Sequence[int] | None) -> torch.Tensor:
        """``h`` with the features set, error term kept; a new tensor (``h`` is never written)."""
        check_place(self.sae, layer, site, "the run's pause")
        f = self.sae.encode(h)
        idx = torch.tensor([i for i, _ in self.features], device=f.device)
        values = torch.tensor([v for _, v in self.features], dtype=f.dtype, device=f.device)
        clamped = f.clone()
        if positions is None:
            clamped[..., idx] = values
        else:
            rows = torch.tensor(list(positions), device=f.device)
            sel = clamped[:, rows]
            sel[..., idx] = values
            clamped[:, rows] = sel
        delta = self.sae.decode(clamped, h) - self.sae.decode(f, h)
        return h + delta.to(h.dtype)


def read_features(host: "RunHost", run_id: str, owner: str, sae: SAE, k: int | None,
                  ids: Sequence[int] | None) -> tuple[list[list[int]], list[list[float]]]:
    """At a pause at the SAE's place: per position, the top-``k`` features and their activations
    (most active first), or the activations of the features ``ids``. Of the pending activation
    (edits applied), in the model's dtype as computed, read back as floats."""
    if (k is None) == (ids is None):
        raise SaeError("features takes k (the top-k per position) or ids (chosen features), one of them")
    if ids is not None:
        if not isinstance(ids, (list, tuple)) or not ids or len(ids) > MAX_IDS:
            raise SaeError(f"ids must be a list of 1 to {MAX_IDS} feature ids")
        ids = [check_feature(sae, i) for i in ids]
    elif isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(MAX_K, sae.d_sae):
        raise SaeError(f"k must be an integer in 1..{min(MAX_K, sae.d_sae)}, got {k!r}"[:200])
    run = host.get(run_id, owner)
    with run.lock:
        cp = host.paused(run)
        check_place(sae, cp.layer, cp.site, f"run {run.id} is paused")
        host.residency.restore(run)
        with host.device_turn(), torch.inference_mode():
            acts = sae.encode(cp.pending)[0]  # (positions, d_sae): a run is one row
            if ids is not None:
                chosen = acts[:, torch.tensor(ids, device=acts.device)]
                return [list(ids)] * chosen.shape[0], chosen.float().tolist()
            assert k is not None
            values, top = torch.topk(acts, k, dim=-1)
            return top.tolist(), values.float().tolist()
