"""Attribution patching beside the exact grid: the estimate, the cells it ranks highest, how well
it ranks, and the plots (ROME's three panels, a per-head grid, estimate beside exact).

Why a module of its own: ``tracing.py`` holds the exact grid and its one plot; the cheap first
pass (``attribution_patching``: one clean and one corrupted forward and one backward on the
server, core/attribution.py) and what is done with it — ``top_k_of`` chooses the cells that
``causal_trace(..., cells=...)`` then patches exactly, ``rank_agreement`` says how far the
estimate's order can be trusted — are a workflow of their own.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import BadRequestError
from ..wire.calls import AttributionReply, AttributionRequest, read_reply
from .tracing import GRID_SITES, _prompt, answer_label, check_layers

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

    from ..client import Client

__all__ = ["attribution_patching", "top_k_of", "rank_agreement", "plot_trace_panels", "plot_grids_side_by_side"]


def attribution_patching(
    client: "Client",
    clean: str | Sequence[int],
    corrupted: str | Sequence[int],
    answer: int | str | None = None,
    site: str = "resid_post",
    heads: str | Sequence[int] | None = None,
    metric: str = "logit_diff",
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    foil: int | None = None,
) -> "pd.DataFrame":
    """The AtP estimate of ``causal_trace``'s grid, same rows, columns and labels: each cell is
    ``(clean − corrupted activation) · ∂metric/∂activation`` at the corrupted run, the estimated
    change of ``metric`` when that cell is patched. One server call: one clean and one corrupted
    forward and one backward; the model's weights and its parameters' ``requires_grad`` are left
    as they were, and no gradient stays behind.

    ``metric``: ``"logit_diff"`` (logit(answer) − logit(foil); ``foil`` defaults to the corrupted
    prompt's greedy next token, its second-best when that is the answer) or ``"prob"`` (p(answer),
    the exact grid's quantity: then ``corrupt_prob + estimate`` estimates the exact cell).
    ``.attrs``: as ``causal_trace``'s, plus ``metric``, ``clean_metric``, ``corrupt_metric``,
    ``foil``, ``estimate`` (True).
    """
    import pandas as pd

    from .tracing import _frame

    if site not in GRID_SITES:
        raise BadRequestError(f"attribution_patching estimates a grid at one of {list(GRID_SITES)}, not {site!r}")
    if heads is not None and site != "z":
        raise BadRequestError(f"heads are columns of a grid at site 'z' only; site {site!r} has positions")
    request: dict[str, Any] = {"clean": _prompt(clean, "clean"), "corrupted": _prompt(corrupted, "corrupted"),
                               "answer": answer, "site": site, "metric": metric, "foil": foil,
                               "layers": check_layers(client, layers),
                               "positions": None if positions is None else list(positions)}
    if site == "z":
        request["heads"] = "all" if heads is None else heads if isinstance(heads, str) else list(heads)
    sent = json.dumps(AttributionRequest(**request).to_json())
    reply = read_reply("attribution_patching", AttributionReply, client._call("attribution_patching", sent))
    frame = _frame(pd, reply.to_json(), reply.layers, dict(zip(reply.layers, reply.rows)), site)
    frame.attrs.update(metric=reply.metric, clean_metric=reply.clean_metric, corrupt_metric=reply.corrupt_metric,
                       foil=reply.foil, estimate=True)
    return frame


def _column_ids(frame: "pd.DataFrame") -> list[int]:
    """The columns as grid coordinates: heads at ``z``, else positions."""
    ids = frame.attrs.get("heads") if frame.attrs.get("site") == "z" else frame.attrs.get("positions")
    if not ids or len(ids) != frame.shape[1]:
        raise BadRequestError("not a causal_trace or attribution_patching grid (its attrs name no positions or heads)")
    return [int(i) for i in ids]


def top_k_of(grid: "pd.DataFrame", k: int, absolute: bool = False) -> list[tuple[int, int]]:
    """The ``k`` cells of ``grid`` with the highest values (``absolute``: the largest magnitudes),
    highest first, as (layer, column) pairs — the column a position, or a head at ``z`` — which
    ``causal_trace(..., cells=...)`` takes. NaN cells are never chosen."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise BadRequestError(f"k must be a positive integer, got {k!r}")
    columns = _column_ids(grid)
    values = grid.to_numpy(dtype=float)
    cells = [(float(abs(v) if absolute else v), int(layer), columns[j])
             for i, layer in enumerate(grid.index) for j, v in enumerate(values[i]) if v == v]
    cells.sort(key=lambda c: -c[0])
    return [(layer, column) for _, layer, column in cells[:k]]


def rank_agreement(estimate: "pd.DataFrame", exact: "pd.DataFrame", k: int = 10, top: int = 10) -> dict[str, float]:
    """How well ``estimate`` orders the cells of ``exact`` (two grids of the same shape): Spearman's
    rank correlation over every cell both have, and the share of ``exact``'s ``top`` highest cells
    found among ``estimate``'s ``k`` highest (``recall``)."""
    import numpy as np

    if estimate.shape != exact.shape or list(estimate.index) != list(exact.index):
        raise BadRequestError(f"the grids differ in shape: {estimate.shape} vs {exact.shape}")
    a, b = estimate.to_numpy(dtype=float).ravel(), exact.to_numpy(dtype=float).ravel()
    both = np.isfinite(a) & np.isfinite(b)
    best_exact = set(top_k_of(exact, top))
    found = best_exact & set(top_k_of(estimate, k))
    return {"spearman": _spearman(a[both], b[both]), "recall": len(found) / max(1, len(best_exact)),
            "k": k, "top": top, "cells": int(both.sum())}


def _spearman(a: Any, b: Any) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties get their mean rank)."""
    import pandas as pd

    if len(a) < 2:
        return float("nan")
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def _heatmap(ax: Any, frame: "pd.DataFrame", cmap: str, title: str, label: str, fig: Any,
             vmin: float | None = None, vmax: float | None = None) -> None:
    data = frame.to_numpy(dtype=float).T
    image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(data.shape[1]), [str(i) for i in frame.index], fontsize=7)
    ax.set_yticks(range(data.shape[0]), [str(c) for c in frame.columns], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax).set_label(label, fontsize=8)


def plot_trace_panels(frames: Sequence["pd.DataFrame"], title: str | None = None) -> "Figure":
    """ROME's figure: one heatmap per grid (e.g. ``resid_post``, ``mlp_out``, ``attn_out``) side by
    side, positions down, layers across, each panel named by its site; one colour scale for all."""
    import numpy as np

    from .plots import figure_class

    if not frames:
        raise BadRequestError("plot_trace_panels needs at least one grid")
    cmaps = {"mlp_out": "Greens", "attn_out": "Reds", "z": "Oranges"}
    values = np.concatenate([f.to_numpy(dtype=float).ravel() for f in frames])
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    first = frames[0]
    fig = figure_class()(figsize=(4.2 * len(frames) + 0.8, 1.8 + 0.3 * first.shape[1]))
    axes = fig.subplots(1, len(frames), squeeze=False)[0]
    label = f"p({answer_label(first.attrs)})"
    for i, (ax, frame) in enumerate(zip(axes, frames)):
        site = frame.attrs.get("site", "resid_post")
        _heatmap(ax, frame, cmaps.get(site, "Purples"), f"restored at {site}", label, fig, lo, hi)
        ax.set_ylabel("head" if site == "z" else "restored position" if i == 0 else "")
        if i:
            ax.tick_params(labelleft=site == "z" or frame.columns.tolist() != first.columns.tolist())
    fig.suptitle(title or f"p({label[2:-1]}) with one clean activation restored", fontsize=10)
    fig.tight_layout()
    return fig


def plot_grids_side_by_side(estimate: "pd.DataFrame", exact: "pd.DataFrame", title: str | None = None) -> "Figure":
    """The attribution estimate (its own diverging scale, centred on 0) beside the exact grid, with
    the exact grid's top cells outlined on both, and Spearman's rho in the title."""
    import numpy as np
    from matplotlib.patches import Rectangle

    from .plots import figure_class

    fig = figure_class()(figsize=(10.0, 1.8 + 0.3 * exact.shape[1]))
    left, right = fig.subplots(1, 2)
    span = float(np.nanmax(np.abs(estimate.to_numpy(dtype=float)))) or 1.0
    metric = estimate.attrs.get("metric", "metric")
    _heatmap(left, estimate, "RdBu_r", f"AtP estimate (Δ {metric})", f"estimated Δ {metric}", fig, -span, span)
    _heatmap(right, exact, "Purples", "exact (patched)", f"p({answer_label(exact.attrs)})", fig)
    left.set_ylabel("head" if exact.attrs.get("site") == "z" else "position")
    columns = _column_ids(exact)
    for layer, column in top_k_of(exact, min(10, exact.size)):
        x, y = list(exact.index).index(layer), columns.index(column)
        for ax in (left, right):
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.0))
    agree = rank_agreement(estimate, exact)
    fig.suptitle(title or f"at {exact.attrs.get('site')}: Spearman {agree['spearman']:.2f}, "
                 f"the exact top 10 (outlined) in the estimate's top 10: {agree['recall']:.0%}", fontsize=10)
    fig.tight_layout()
    return fig
