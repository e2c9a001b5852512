"""Causal tracing (ROME's figure 1): which (layer, position) restores the answer.

The grid is computed on the server in one call (``core/tracing.py``): each prompt passes
once, pausing at every traced layer, and each layer's cells run the remaining layers as one
batch from that layer's checkpoint — no run per cell, no activation on the wire. With a
progress bar the layers go in up to three calls (a row of the bar each), so the round trips
stay a handful whatever the grid's size; Ctrl-C between two of them stops the trace.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal, Sequence

from ..errors import BadRequestError
from ..wire.calls import CausalTraceReply, CausalTraceRequest, read_reply

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

    from ..client import Client

__all__ = ["causal_trace", "plot_causal_trace"]

RESIDUAL_AND_OUTPUT_SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
GRID_SITES = ("resid_pre", "z", "attn_out", "resid_mid", "mlp_out", "resid_post")
#: With a progress bar, the layers go in at most this many calls.
PROGRESS_CALLS = 3


def _prompt(prompt: str | Sequence[int], what: str) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt and all(type(t) is int for t in prompt):
        return list(prompt)
    raise BadRequestError(f"{what} must be text or a non-empty list of token ids")


def check_layers(client: "Client", layers: Sequence[int] | None) -> list[int]:
    n_layers = int(client.info["num_layers"])
    wanted = list(range(n_layers)) if layers is None else sorted(set(layers))
    if not wanted or any(type(x) is not int or not 0 <= x < n_layers for x in wanted):
        raise BadRequestError(f"layers must be integers in 0..{n_layers - 1}, got {layers!r}"[:200])
    return wanted


def _cells(cells: Any) -> list[list[int]] | None:
    if cells is None:
        return None
    try:
        pairs = [list(c) for c in cells]
    except TypeError:
        raise BadRequestError("cells must be a list of (layer, column) pairs") from None
    if any(len(c) != 2 or any(type(x) is not int for x in c) for c in pairs):
        raise BadRequestError(f"cells must be (layer, column) pairs of integers, got {str(cells)[:100]!r}")
    return pairs


def causal_trace(
    client: "Client",
    clean: str | Sequence[int],
    corrupted: str | Sequence[int],
    answer: int | str | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    site: str = "resid_post",
    progress: bool = True,
    heads: str | Sequence[int] | None = None,
    cells: Sequence[tuple[int, int]] | None = None,
) -> "pd.DataFrame":
    """The probability of ``answer`` when the clean activation at (layer, position) is restored
    into the corrupted run's prompt pass: a DataFrame with layers as index and positions as
    columns (labelled ``"3:  Tower"`` when the server has a tokenizer).

    ``site="z"`` gives a per-head grid: layers × heads (``heads``: "all", the default, or a list),
    each cell the clean ``z`` of that one head restored at every position of ``positions``
    (default all; ``positions=[p]``: at ``p`` only), the layer's other heads left corrupted.

    ``cells``: (layer, column) pairs — the column a position, or a head at ``z`` — to compute; the
    grid keeps its shape and every other cell is NaN (``top_k_of(estimate, k)`` names the cells
    an ``attribution_patching`` estimate ranks highest). Only the layers with a cell are run.

    ``clean_prob`` is the clean run's own probability of ``answer`` (its prompt pass, nothing
    patched), at every site: restoring every position of one site is the clean run only at the
    residual sites, not at ``attn_out``/``mlp_out``. ``corrupt_prob`` (nothing restored) is
    computed in the same batch as the first layer's cells, so a cell whose restored input
    equals the corrupted one shows exactly the same number.

    ``answer``: a token id or a text of one token; default the clean run's greedy next token.
    ``.attrs``: ``clean_prob``, ``corrupt_prob``, ``answer`` (id), ``answer_text`` (with a
    tokenizer, else None), ``site``, ``positions``, ``tokens``, ``heads`` ([] unless ``z``).
    Both prompts must have the same number of tokens. One server call (up to three with
    ``progress``), whatever the grid's size.
    """
    import pandas as pd

    if site not in GRID_SITES:
        raise BadRequestError(f"causal_trace patches one of {list(GRID_SITES)}, not {site!r}")
    if heads is not None and site != "z":
        raise BadRequestError(f"heads are columns of a grid at site 'z' only; site {site!r} has positions")
    request: dict[str, Any] = {"clean": _prompt(clean, "clean"), "corrupted": _prompt(corrupted, "corrupted"),
                               "answer": answer, "site": site,
                               "positions": None if positions is None else list(positions)}
    if site == "z":
        request["heads"] = "all" if heads is None else heads if isinstance(heads, str) else list(heads)
    wanted = check_layers(client, layers)
    pairs = _cells(cells)
    if pairs is not None:  # one call: the server checks every cell against the whole grid before it runs any
        request["cells"] = pairs
    calls = min(PROGRESS_CALLS, len(wanted)) if progress and pairs is None else 1
    chunks = [wanted[i * len(wanted) // calls:(i + 1) * len(wanted) // calls] for i in range(calls)]
    bar = _progress(progress, len(wanted))
    rows: dict[int, list[float | None]] = {}
    first: dict[str, Any] = {}
    try:
        for chunk in chunks:
            sent = json.dumps(CausalTraceRequest(**dict(request, layers=chunk)).to_json())
            reply = read_reply("causal_trace", CausalTraceReply, client._call("causal_trace", sent))
            first = first or reply.to_json()
            request["answer"] = reply.answer  # the later chunks trace the same answer
            rows.update(zip(reply.layers, reply.rows))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return _frame(pd, first, wanted, rows, site)


def _frame(pd: Any, first: dict[str, Any], wanted: list[int], rows: dict[int, list[float | None]], site: str) -> "pd.DataFrame":
    """The grid as a DataFrame: the layers asked for as index (a row not computed: NaN), positions
    (or heads at ``z``) as columns."""
    ids, chosen, heads = first["clean_ids"], first["positions"], first.get("heads") or []
    texts = dict(zip(first["text_ids"], first["texts"]))
    if site == "z":
        columns = pd.Index(heads, name="head")
    else:
        columns = pd.Index([f"{p}: {texts[ids[p]]}" for p in chosen] if texts else chosen, name="position")
    nan = float("nan")
    data = [[nan if v is None else v for v in rows.get(layer, [None] * len(columns))] for layer in wanted]
    frame = pd.DataFrame(data, index=pd.Index(wanted, name="layer"), columns=columns, dtype=float)
    frame.attrs.update(clean_prob=first["clean_prob"], corrupt_prob=first["corrupt_prob"], answer=int(first["answer"]),
                       answer_text=texts.get(first["answer"]), site=site, positions=chosen,
                       tokens=[ids[p] for p in chosen], heads=heads)
    return frame


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc="causal trace (layers)", leave=False)


def answer_label(attrs: dict[str, Any]) -> str:
    """``' Paris' #7042`` (or ``#7042`` without a tokenizer): the answer token by text and id."""
    answer, text = attrs.get("answer"), attrs.get("answer_text")
    if answer is None:
        return "answer"
    return f"{text!r} #{answer}" if text is not None else f"#{answer}"


def _positions(attrs: dict[str, Any]) -> str:
    """``0-10`` for a run of consecutive positions, else the list."""
    positions = list(attrs.get("positions") or [])
    if len(positions) > 2 and positions == list(range(positions[0], positions[-1] + 1)):
        return f"{positions[0]}-{positions[-1]}"
    return ", ".join(map(str, positions))


def plot_causal_trace(frame: "pd.DataFrame", title: str | None = None) -> "Figure":
    """The grid as a heatmap (positions × layers, token labels), with the clean and corrupted
    runs' probabilities marked on the colour bar and named in a legend below.

    A ``matplotlib.figure.Figure`` that is not pyplot's: as a cell's last line it is shown once
    (a pyplot figure was drawn twice: as the value, and again when the cell ended).
    """
    from matplotlib.lines import Line2D

    from .plots import figure_class

    import numpy as np

    data = frame.to_numpy(dtype=float).T
    fig = figure_class()(figsize=(max(5.0, 1.6 + 0.45 * data.shape[1]), 1.6 + 0.32 * data.shape[0]))
    ax = fig.subplots()
    finite = data[np.isfinite(data)] if np.isfinite(data).any() else np.zeros(1)  # cells= leaves the others NaN
    lo = min(float(finite.min()), frame.attrs.get("corrupt_prob", float(finite.min())))
    hi = max(float(finite.max()), frame.attrs.get("clean_prob", float(finite.max())))
    image = ax.imshow(data, aspect="auto", cmap="Purples", vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_xticks(range(data.shape[1]), [str(i) for i in frame.index])
    ax.set_yticks(range(data.shape[0]), [str(c) for c in frame.columns])
    ax.set_xlabel(f"layer (restored at {frame.attrs.get('site', 'resid_post')})")
    heads = frame.attrs.get("site") == "z"
    ax.set_ylabel("restored head" + (f" (at positions {_positions(frame.attrs)})" if heads else "") if heads
                  else "restored position")
    label = answer_label(frame.attrs)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"p({label})")
    handles = []
    lines: tuple[tuple[str, Literal["-", "--"], str], ...] = (("clean_prob", "-", "clean run"),
                                                              ("corrupt_prob", "--", "corrupted run"))
    for key, style, name in lines:
        if key in frame.attrs:
            value = frame.attrs[key]
            bar.ax.axhline(value, color="black", linestyle=style, linewidth=1.5)
            handles.append(Line2D([], [], color="black", linestyle=style, label=f"{name}: {value:.4f}"))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    ax.set_title(title or f"p({label}) with the clean state restored", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    return fig
