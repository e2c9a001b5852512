"""Apply a validated :class:`~djinn_nb.core.specs.Edit` to a paused checkpoint's activation.

Every check happens before anything changes, so a refused edit leaves the run
exactly as it was. The result is a new tensor; the checkpoint's own value
(``hidden``) is never written.
"""
from __future__ import annotations

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


def apply_edit(hidden: torch.Tensor, pending: torch.Tensor, site: str, edit: Edit | None, where: str) -> torch.Tensor:
    """The activation to continue from: ``pending`` (or ``hidden`` with ``original``) with ``edit``.

    ``where`` names the checkpoint in error messages (e.g. ``"layer 6 step 0 site z"``).
    """
    h = pending
    if edit is None or edit.empty:
        return h
    if edit.original:
        h = hidden
    ref = hidden
    heads = _heads(edit, site, ref)
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
        return h
    part = h[..., heads, :] if heads else h
    if edit.scale is not None:
        part = part * edit.scale
    if v is not None:
        part = part + v
    if heads:
        h = h.clone()
        h[..., heads, :] = part
    else:
        h = part
    if not bool(torch.isfinite(h).all()):
        raise ActivationError(f"the edit makes the activation non-finite in {_name(ref.dtype)} (overflow); nothing was changed")
    return h
