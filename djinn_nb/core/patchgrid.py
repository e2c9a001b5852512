"""What a patching grid's columns are, which cells to compute, and how one cell's patch is made.

Why a module of its own: the exact grid (``tracing.py``) and the attribution estimate
(``attribution.py``) must agree on one grid — the same rows, the same columns, the same meaning
of a cell — or an estimate could not choose the cells worth patching exactly. A grid's rows are
layers; its columns are positions at the residual stream and the blocks' two outputs
(``resid_pre``, ``attn_out``, ``resid_mid``, ``mlp_out``, ``resid_post``: the clean value
restored at that one position), or heads at ``z`` (the head's clean ``z`` restored at every
position of ``positions`` together, the rest of that layer's ``z`` left corrupted), as in
TransformerLens' per-head patching. Every check here runs before anything is computed, so a
refused request changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import BadRequestError

#: Sites a grid restores: the residual stream, each block's two outputs, and per-head ``z``.
GRID_SITES = ("resid_pre", "z", "attn_out", "resid_mid", "mlp_out", "resid_post")


@dataclass(frozen=True)
class GridSpec:
    """A grid: rows ``layers``; columns ``positions`` (``heads`` empty) or ``heads`` (site ``z``,
    each restored at all of ``positions``); ``cells[layer]``: the column indices computed there."""

    site: str
    layers: list[int]
    positions: list[int]
    heads: list[int]
    cells: dict[int, list[int]]

    @property
    def columns(self) -> list[int]:
        return self.heads if self.site == "z" else self.positions

    def traced_layers(self) -> list[int]:
        """The layers with at least one cell to compute (the only ones a pass must pause at)."""
        return [layer for layer in self.layers if self.cells.get(layer)]


def check_site(site: Any) -> str:
    if not isinstance(site, str) or site not in GRID_SITES:
        raise BadRequestError(f"a patching grid restores one of {list(GRID_SITES)}, not {str(site)[:60]!r}")
    return site


def check_heads(site: str, heads: Any, num_heads: int) -> list[int]:
    """``heads`` ("all", a list of head indices, or None) for ``site``; [] for a site without heads."""
    if site != "z":
        if heads is not None:
            raise BadRequestError(f"heads are columns of a grid at site 'z' only; site {site!r} has positions")
        return []
    if num_heads <= 0:
        raise BadRequestError("this model's heads are not known to djinn_nb: no per-head grid")
    if heads is None or heads == "all":
        return list(range(num_heads))
    if not isinstance(heads, (list, tuple)) or not heads or any(type(h) is not int for h in heads):
        raise BadRequestError(f"heads must be 'all' or a non-empty list of integers, got {str(heads)[:100]!r}")
    if any(not 0 <= h < num_heads for h in heads):
        raise BadRequestError(f"heads must be integers in 0..{num_heads - 1}, got {list(heads)!r}"[:200])
    if len(set(heads)) != len(heads):
        raise BadRequestError("heads must be distinct")
    return list(heads)


def check_cells(cells: Any, layers: Sequence[int], columns: Sequence[int], column_name: str) -> dict[int, list[int]]:
    """``cells`` (None: every cell; else a list of ``[layer, column]`` pairs, the column a position or
    a head by its value) as the column indices to compute per layer, in the grid's column order."""
    if cells is None:
        return {layer: list(range(len(columns))) for layer in layers}
    if not isinstance(cells, (list, tuple)) or len(cells) > len(layers) * len(columns) * 4 + 16:
        raise BadRequestError("cells must be a list of [layer, column] pairs")
    index = {c: i for i, c in enumerate(columns)}
    rows = set(layers)
    chosen: dict[int, set[int]] = {}
    for cell in cells:
        if (not isinstance(cell, (list, tuple)) or len(cell) != 2 or any(type(x) is not int for x in cell)):
            raise BadRequestError(f"cells must be [layer, {column_name}] pairs of integers, got {str(cell)[:60]!r}")
        layer, column = cell
        if layer not in rows or column not in index:
            raise BadRequestError(f"cell {[layer, column]} is outside the grid: layers {_span(layers)}, "
                                  f"{column_name}s {_span(columns)}"[:300])
        chosen.setdefault(layer, set()).add(index[column])
    if not chosen:
        raise BadRequestError("cells is empty: name at least one [layer, column] to patch")
    return {layer: sorted(cols) for layer, cols in chosen.items()}


def _span(values: Sequence[int]) -> str:
    values = list(values)
    return f"{values[0]}..{values[-1]}" if values == list(range(values[0], values[-1] + 1)) else str(values)[:120]


def grid_spec(site: Any, layers: list[int], positions: list[int], heads: Any, cells: Any, num_heads: int) -> GridSpec:
    """The whole request checked (layers and positions already checked by ``tracing.check_grid``)."""
    site = check_site(site)
    head_list = check_heads(site, heads, num_heads)
    columns = head_list if site == "z" else positions
    return GridSpec(site, layers, positions, head_list,
                    check_cells(cells, layers, columns, "head" if site == "z" else "position"))


def patched_starts(pending: torch.Tensor, clean: torch.Tensor, spec: GridSpec, chosen: Sequence[int],
                   reference: bool) -> torch.Tensor:
    """One row per chosen column: the paused (corrupted) value with that column's clean value
    restored (at one position; at ``z``, one head at every position of the grid) — plus the unpatched value as the last row when ``reference``."""
    starts = pending.repeat(len(chosen) + int(reference), *([1] * (pending.dim() - 1)))
    rows = torch.arange(len(chosen), device=starts.device)
    if spec.site == "z":
        pos = torch.tensor(spec.positions, device=starts.device)
        for row, j in zip(rows.tolist(), chosen):
            h = spec.heads[j]
            starts[row, pos, h] = clean[0, pos, h]
    else:
        cols = torch.tensor([spec.positions[j] for j in chosen], device=starts.device)
        starts[rows, cols] = clean[0, cols]
    return starts


__all__ = ["GRID_SITES", "GridSpec", "check_cells", "check_heads", "check_site", "grid_spec", "patched_starts"]
