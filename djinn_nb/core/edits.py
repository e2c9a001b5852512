"""Apply a validated :class:`~djinn_nb.core.specs.Edit` to a paused checkpoint's activation.

Every check happens before anything changes, so a refused edit leaves the run
exactly as it was. The result is a new tensor; the checkpoint's own value
(``hidden``) is never written. A patch (``patch_from``) arrives here already
resolved to the other run's activation (:class:`PatchSource`), so this module
needs no registry.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ActivationError
from .specs import Edit, finite_number


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _heads(edit: Edit, site: str, ref: torch.Tensor) -> list[int] | None:
    if edit.heads is None:
        return None
    if site != "z":
        raise ActivationError(f"heads= applies at site 'z' (per-head attention outputs), not at {site!r}")
    n = ref.shape[-2]
    heads = list(edit.heads)
    bad = [h for h in heads if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < n]
    if bad or not heads or len(set(heads)) != len(heads):
        raise ActivationError(f"heads must be distinct integers in 0..{n - 1}, got {heads!r}"[:300])
    if edit.scale is None and edit.add is None:
        raise ActivationError("heads= restricts scale= or add=: pass one of them")
    return sorted(heads)


@dataclass(frozen=True)
class PatchSource:
    """Another paused run's activation, for ``patch_from``: where it paused and its value."""

    run_id: str
    where: str  # its checkpoint's ``where`` ("layer 6 step 0 site z")
    value: torch.Tensor  # its pending activation (its own edits applied)


def _positions(edit: Edit, n_here: int, n_there: int) -> list[int]:
    positions = list(edit.positions or ())
    n = min(n_here, n_there)
    bad = [p for p in positions if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n]
    if bad or not positions or len(set(positions)) != len(positions):
        raise ActivationError(
            f"positions must be distinct integers in 0..{n - 1} (positions in both runs), got {positions!r}"[:300]
        )
    return sorted(positions)


def _patched(h: torch.Tensor, edit: Edit, patch: PatchSource | None, where: str) -> torch.Tensor:
    """``h`` with the source run's activation written at ``edit.positions`` (all of it with ``None``)."""
    if patch is None:
        if edit.patch_from is not None:
            raise ActivationError(f"patch_from={edit.patch_from!r} was not resolved to a paused run")
        if edit.positions is not None and edit.clamp is None:
            raise ActivationError("positions= selects where patch_from (or a clamp) writes: pass patch_from too (or clamp=)")
        return h
    if edit.activation is not None:
        raise ActivationError("pass either activation= or patch_from=, not both: each replaces the activation")
    if patch.where != where:
        raise ActivationError(
            f"patch_from run {patch.run_id} is paused at {patch.where}, this run at {where}: "
            "patching needs the same layer, step and site"
        )
    src = patch.value
    if src.dtype != h.dtype or src.dim() != h.dim() or src.shape[:1] + src.shape[2:] != h.shape[:1] + h.shape[2:]:
        raise ActivationError(
            f"patch_from run {patch.run_id}'s activation has shape {tuple(src.shape)} ({_name(src.dtype)}), "
            f"this run's {tuple(h.shape)} ({_name(h.dtype)}): only the number of positions may differ"
        )
    if edit.positions is None:
        if src.shape != h.shape:
            raise ActivationError(
                f"patch_from run {patch.run_id} has {src.shape[1]} positions, this run {h.shape[1]}: "
                "pass positions= to patch the ones both have"
            )
        return src.to(h.device)
    idx = _positions(edit, h.shape[1], src.shape[1])
    out = h.clone()
    out[:, idx] = src[:, idx].to(h.device)
    return out


def apply_edit(hidden: torch.Tensor, pending: torch.Tensor, site: str, edit: Edit | None, where: str,
               patch: PatchSource | None = None, check_finite: bool = True, layer: int = -1) -> torch.Tensor:
    """The activation to continue from: ``pending`` (or ``hidden`` with ``original``) with ``edit``.

    ``where`` names the checkpoint in error messages (e.g. ``"layer 6 step 0 site z"``), ``layer``
    is its layer (a clamp's SAE must be at it); ``patch`` is ``edit.patch_from`` resolved by the engine. ``check_finite=False`` leaves the
    result's finiteness (a device read) to the caller, who checks many at once.
    """
    h = pending
    if edit is None or edit.empty:
        return h
    if edit.original:
        h = hidden
    ref = hidden
    heads = _heads(edit, site, ref)
    h = _patched(h, edit, patch, where)
    if edit.activation is not None:
        a = edit.activation
        if not isinstance(a, torch.Tensor):
            raise ActivationError(f"activation must be a tensor, got {type(a).__name__}")
        if tuple(a.shape) != tuple(ref.shape):
            raise ActivationError(f"activation has shape {tuple(a.shape)}, the checkpoint at {where} has {tuple(ref.shape)}")
        if a.dtype != ref.dtype:
            raise ActivationError(f"activation has dtype {_name(a.dtype)}, the model runs in {_name(ref.dtype)}")
        if not bool(torch.isfinite(a).all()):
            raise ActivationError("activation contains NaN or infinite values")
        h = a.to(ref.device)
    if edit.clamp is not None:  # an SAE's features set, its error term kept (features.py)
        positions = None if edit.positions is None else _positions(edit, h.shape[1], h.shape[1])
        h = edit.clamp.apply(h, layer, site, positions)
    v = None
    if edit.add is not None:
        v = edit.add
        if not isinstance(v, torch.Tensor):
            raise ActivationError(f"add must be a tensor, got {type(v).__name__}")
        target = tuple(ref.shape[:-2]) + (len(heads),) + tuple(ref.shape[-1:]) if heads else tuple(ref.shape)
        shape = tuple(v.shape)
        if not shape or shape != target[-len(shape):]:
            raise ActivationError(
                f"add must have shape {target[-1:]} or {target}, got {shape} (any trailing part of {target} broadcasts)"[:300]
            )
        if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
            raise ActivationError("add must be a finite floating-point tensor")
        v = v.to(device=ref.device, dtype=ref.dtype)
    if edit.scale is not None and not finite_number(edit.scale):
        raise ActivationError(f"scale must be a finite number, got {edit.scale!r}")
    if edit.scale is None and v is None:
        if (patch is not None or edit.clamp is not None) and not bool(torch.isfinite(h).all()):
            raise ActivationError(f"patch_from run {patch.run_id}'s activation has NaN or infinite values"
                                  if patch is not None else "the clamp makes the activation non-finite; nothing was changed")
        return h
    part = h[..., heads, :] if heads else h
    if edit.scale is not None:
        part = part * float(edit.scale)  # an int past int64 (JSON allows any) would overflow torch's scalar
    if v is not None:
        part = part + v
    if heads:
        h = h.clone()
        h[..., heads, :] = part
    else:
        h = part
    if check_finite and not bool(torch.isfinite(h).all()):
        raise ActivationError(f"the edit makes the activation non-finite in {_name(ref.dtype)} (overflow); nothing was changed")
    return h
