"""Tables and figures of the breakpoint study, from plain records or DataFrames.

Each function takes a DataFrame, a list of dicts or a dict of lists with the
columns it documents, and returns a DataFrame (tables) or a matplotlib Figure
(figures; close it with ``plt.close(fig)`` when done). Nothing here talks to a
server: results come from :mod:`djinn_nb.notebook.metrics`, an experiment's JSON, or
anywhere else.
"""
from __future__ import annotations

import functools

from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from ..errors import DjinnError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch
    from matplotlib.figure import Figure

__all__ = [
    "as_frame",
    "token_accuracy_table",
    "plot_token_accuracy",
    "LATENCY_PARTS",
    "latency_breakdown_table",
    "plot_latency_breakdown",
    "plot_steering_effect",
    "plot_activation",
    "plot_lens_grid",
    "plot_attention",
    "to_png",
    "show",
]

LATENCY_PARTS = ["checkpoint_ms", "restore_ms", "remaining_ms", "transport_ms"]
_LATENCY_LABELS = {"checkpoint_ms": "checkpoint", "restore_ms": "restore", "remaining_ms": "remaining layers",
                   "transport_ms": "transport"}
_STEERING_METRICS = [
    ("token_change_rate", "token change rate"),
    ("kl", "KL(base ‖ steered), nats"),
    ("logit_change", "relative logit change"),
]


def as_frame(data: Any, required: Iterable[str] = ()) -> "pd.DataFrame":
    """A DataFrame from a DataFrame, a list of dicts or a dict of lists; checks ``required`` columns."""
    import pandas as pd

    df = data.copy() if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"missing column(s) {missing}; got {list(df.columns)}")
    if df.empty:
        raise ValueError("no rows to draw")
    return df


@functools.lru_cache(maxsize=None)
def figure_class() -> type:
    """``matplotlib.figure.Figure`` that shows itself once as a PNG when it is a cell's last line.

    The figures here are never pyplot's (pyplot would draw them again when the cell ends, and
    keep them open); a plain Figure has no image repr unless pyplot's inline backend was
    loaded, so this one brings its own.
    """
    from matplotlib.figure import Figure

    class NotebookFigure(Figure):
        def _repr_png_(self) -> bytes:
            return to_png(self)

    return NotebookFigure


def _figure(ncols: int = 1, width: float = 5.0, height: float = 3.4) -> tuple["Figure", Any]:
    fig = figure_class()(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def token_accuracy_table(data: Any) -> "pd.DataFrame":
    """Token accuracy (%) with one row per layer, one column per trial, plus mean and std.

    Columns of ``data``: ``layer``, ``trial``, ``token_accuracy`` (a fraction, 0..1).
    """
    df = as_frame(data, ["layer", "trial", "token_accuracy"])
    table = df.pivot_table(index="layer", columns="trial", values="token_accuracy", aggfunc="mean") * 100
    table.columns = [f"trial {c}" for c in table.columns]
    pct = df.assign(pct=df["token_accuracy"] * 100).groupby("layer")["pct"]
    table["mean"] = pct.mean()
    table["std"] = pct.std(ddof=0)
    return table.round(2)


def plot_token_accuracy(data: Any) -> "Figure":
    """Grouped bars: token accuracy (%) per breakpoint layer, one bar per trial.

    Columns: ``layer``, ``trial``, ``token_accuracy`` (fraction, 0..1).
    """
    df = as_frame(data, ["layer", "trial", "token_accuracy"])
    layers = sorted(df["layer"].unique())
    trials = sorted(df["trial"].unique())
    fig, ax = _figure()
    width = 0.8 / len(trials)
    for j, trial in enumerate(trials):
        sub = df[df["trial"] == trial].groupby("layer")["token_accuracy"].mean()
        xs = [i + (j - (len(trials) - 1) / 2) * width for i in range(len(layers))]
        ax.bar(xs, [sub.get(layer, float("nan")) * 100 for layer in layers], width, label=f"trial {trial}")
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("breakpoint layer")
    ax.set_ylabel("token accuracy (%)")
    ax.set_ylim(0, 118)
    ax.set_title("Paused-and-resumed vs unpaused generation")
    ax.legend(loc="upper center", ncol=min(len(trials), 5), fontsize=8, frameon=False)
    return fig


def latency_breakdown_table(data: Any) -> "pd.DataFrame":
    """Mean milliseconds of each latency part per ``label``, and their total.

    Columns: ``label`` and any of ``LATENCY_PARTS`` (checkpoint, restore,
    remaining layers, transport; missing parts count as 0).
    """
    df = as_frame(data, ["label"])
    parts = [p for p in LATENCY_PARTS if p in df.columns]
    if not parts:
        raise ValueError(f"need at least one of the columns {LATENCY_PARTS}; got {list(df.columns)}")
    table = df.groupby("label", sort=False)[parts].mean()
    table["total_ms"] = table.sum(axis=1)
    return table.round(3)


def plot_latency_breakdown(data: Any) -> "Figure":
    """Stacked horizontal bars of the latency parts (ms) per ``label`` (e.g. ``"layer 6"``).

    Columns: ``label`` and any of ``LATENCY_PARTS``; rows with the same label are averaged.
    """
    table = latency_breakdown_table(data).drop(columns="total_ms")
    fig, ax = _figure(width=6.5, height=0.6 * len(table) + 1.8)
    left = [0.0] * len(table)
    labels = [str(x) for x in table.index]
    for part in table.columns:
        vals = table[part].tolist()
        ax.barh(labels, vals, left=left, label=_LATENCY_LABELS[part])
        left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds")
    ax.set_title("Latency breakdown")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_steering_effect(data: Any) -> "Figure":
    """Three panels against the steering factor: token change rate, KL, relative logit change.

    Columns: ``factor``, ``token_change_rate``, ``kl``, ``logit_change`` and
    optionally ``layer`` (one line per layer), as :func:`djinn_nb.notebook.metrics.steering_sweep` returns.
    """
    df = as_frame(data, ["factor"] + [c for c, _ in _STEERING_METRICS])
    groups = df.groupby("layer", sort=True) if "layer" in df.columns else [(None, df)]
    fig, axes = _figure(ncols=3, width=4.0)
    for layer, sub in groups:
        sub = sub.sort_values("factor")
        for ax, (col, _title) in zip(axes, _STEERING_METRICS):
            ax.plot(sub["factor"], sub[col], marker="o", ms=3, label=None if layer is None else f"layer {layer}")
    for ax, (_col, title) in zip(axes, _STEERING_METRICS):
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("scale factor")
        ax.set_title(title)
    if "layer" in df.columns:
        axes[0].legend(fontsize=8)
    fig.suptitle("Steering effect of scaling one layer's output")
    return fig


SINK_RATIO = 20.0  # a norm this many times the median one gets a log scale (an attention sink)


def plot_activation(tensor: "torch.Tensor", tokens: Sequence[str] | None = None, title: str = "",
                    log: bool | None = None) -> "Figure":
    """Two panels for a paused activation (batch, positions, hidden), or at site ``z``
    (batch, positions, heads, head_dim): per-position L2 norm (over all heads at ``z``), value histogram.

    ``log=None`` puts the norms on a log scale when one position's norm is over ``SINK_RATIO``
    times the median (position 0 is often an attention sink, ~100x the others, which would
    flatten every other bar); ``True``/``False`` forces it."""
    t = tensor.detach().float()
    if t.dim() == 4:
        t = t.flatten(2)
    per_pos = t[0] if t.dim() == 3 else t.reshape(-1, t.shape[-1])
    norms = per_pos.norm(dim=-1).tolist()
    fig, (ax1, ax2) = _figure(ncols=2, width=4.8)
    ax1.bar(range(len(norms)), norms, color="#4c72b0")
    if tokens is not None and len(tokens) == len(norms) and len(norms) <= 40:
        ax1.set_xticks(range(len(norms)), [repr(s)[1:-1] for s in tokens], rotation=60, ha="right", fontsize=7)
    ax1.set_xlabel("position")
    positive = sorted(n for n in norms if n > 0)
    if log is None:
        log = bool(positive) and positive[-1] > SINK_RATIO * positive[len(positive) // 2]
    ax1.set_ylabel("L2 norm (log scale)" if log else "L2 norm")
    if log:
        ax1.set_yscale("log")
    ax1.set_title("norm per position")
    ax2.hist(t.flatten().numpy(), bins=80, color="#dd8452", log=True)
    ax2.set_xlabel("value")
    ax2.set_ylabel("count (log)")
    ax2.set_title("histogram of values")
    if title:
        fig.suptitle(title)
    return fig


def _label(text: str, width: int = 8) -> str:
    """A token as a short one-line label (whitespace shown as escapes)."""
    s = repr(str(text))[1:-1]
    return s if len(s) <= width else s[: width - 1] + "…"


def _tick_tokens(ax: Any, axis: str, tokens: Sequence[str] | None, n: int, limit: int = 40) -> None:
    if tokens is None or len(tokens) != n or n > limit:
        return
    labels = [_label(t, 12) for t in tokens]
    if axis == "x":
        ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
    else:
        ax.set_yticks(range(n), labels, fontsize=7)


def _decode_one(decode: Callable[[list[int]], str] | None, token_id: int) -> str:
    if decode is None:
        return f"#{token_id}"
    try:
        return decode([token_id])
    except DjinnError:
        return f"#{token_id}"


def plot_lens_grid(
    grid: Any,
    tokens: Sequence[str] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    labels: Sequence[Sequence[str]] | None = None,
    title: str = "logit lens",
) -> "Figure":
    """The logit-lens heatmap: layers (rows, layer 0 at the bottom) × positions (columns);
    colour = the top-1 probability, each cell labelled with the top-1 token.

    ``grid`` is ``client.lens_grid(prompt)``: ``{"ids": (layers, positions, k), "probs": (layers, positions, k)}``
    (``k`` may be 1; only the top-1 is drawn). ``tokens``: the text of each position (the prompt's tokens),
    for the x axis. The cell labels come from ``labels`` (layers × positions strings), else from
    ``decode`` (e.g. ``client.decode``; called with ``[token_id]``), else they are ``#id``.
    """
    import torch

    ids, probs = torch.as_tensor(grid["ids"]), torch.as_tensor(grid["probs"]).float()
    if ids.dim() == 2:
        ids, probs = ids[..., None], probs[..., None]
    if ids.dim() != 3 or ids.shape != probs.shape:
        raise ValueError(f"grid needs ids and probs of shape (layers, positions, k); got {tuple(ids.shape)}, "
                         f"{tuple(probs.shape)}")
    n_layers, n_pos = ids.shape[:2]
    top_ids, top_p = ids[..., 0].tolist(), probs[..., 0]
    if labels is None:
        unique = list(dict.fromkeys(i for row in top_ids for i in row))
        each = getattr(getattr(decode, "__self__", None), "decode_each", None)  # a client: one call for all
        try:
            cache = dict(zip(unique, each(unique))) if each is not None else {}
        except DjinnError:
            cache = {}
        for i in unique:
            if i not in cache:
                cache[i] = _decode_one(decode, i)
        labels = [[cache[i] for i in row] for row in top_ids]
    fig, ax = _figure(width=min(2.0 + 0.9 * n_pos, 16.0), height=min(1.6 + 0.26 * n_layers, 14.0))
    im = ax.imshow(top_p.numpy(), origin="lower", aspect="auto", cmap="Blues", vmin=0.0, vmax=1.0)
    if n_pos * n_layers <= 2000:
        for layer in range(n_layers):
            for pos in range(n_pos):
                p = float(top_p[layer, pos])
                ax.text(pos, layer, _label(labels[layer][pos]), ha="center", va="center", fontsize=6,
                        color="white" if p > 0.6 else "black")
    ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=6)
    ax.set_xticks(range(n_pos))
    _tick_tokens(ax, "x", tokens, n_pos)
    ax.set_xlabel("position (input token)")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="top-1 probability", shrink=0.8)
    return fig


def plot_attention(
    attention: "torch.Tensor",
    key_tokens: Sequence[str] | None = None,
    query_tokens: Sequence[str] | None = None,
    head: int | Sequence[int] | None = None,
    title: str = "",
    ncols: int = 4,
) -> "Figure":
    """One heatmap per head of an attention pattern: queries (rows) × keys (columns), colour = probability.

    ``attention`` is ``run.attention()``, (batch, heads, queries, keys) (batch 0 is drawn), or
    (heads, queries, keys). ``key_tokens``/``query_tokens`` label the axes (the queries are the
    last positions of the keys when not given: at a decoding step, the one new token).
    ``head``: one head (an int) or a list of heads; all of them by default.
    """
    a = attention.detach().float()
    if a.dim() == 4:
        a = a[0]
    if a.dim() != 3:
        raise ValueError(f"attention must be (batch, heads, queries, keys) or (heads, queries, keys); got {tuple(a.shape)}")
    n_heads, n_q, n_k = a.shape
    heads = list(range(n_heads)) if head is None else ([head] if isinstance(head, int) else list(head))
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad or not heads:
        raise ValueError(f"head must be in 0..{n_heads - 1}; got {bad or heads}")
    if query_tokens is None and key_tokens is not None and len(key_tokens) == n_k:
        query_tokens = list(key_tokens)[n_k - n_q:]
    cols = min(ncols, len(heads))
    rows = -(-len(heads) // cols)
    cell_w = min(max(2.4, 0.22 * n_k + 1.2), 6.0)
    cell_h = min(max(1.2 if n_q == 1 else 2.4, 0.22 * n_q + 1.2), 6.0)
    from matplotlib.figure import Figure

    width = cell_w * cols + 0.8
    if title:  # a single head's figure is narrow: make room for the whole title (11 pt: ~0.085 in a character)
        width = max(width, 0.085 * len(title) + 0.6)
    fig = Figure(figsize=(width, cell_h * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    im = None
    for ax, h in zip(axes, heads):
        im = ax.imshow(a[h].numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(range(n_k))
        ax.set_yticks(range(n_q))
        _tick_tokens(ax, "x", key_tokens, n_k)
        _tick_tokens(ax, "y", query_tokens, n_q)
    for ax in axes[len(heads):]:
        ax.remove()
    axes[0].set_ylabel("query")
    axes[(rows - 1) * cols].set_xlabel("key")
    assert im is not None, "heads is not empty (checked above)"
    fig.colorbar(im, ax=list(axes[: len(heads)]), label="attention", shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def to_png(fig: "Figure", dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def shows_images() -> bool:
    """Whether the current IPython front end renders images (Jupyter does; a terminal IPython,
    whose display formatter is text-only, would print ``<IPython.core.display.Image object>``)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    ip = get_ipython()
    formatter = getattr(ip, "display_formatter", None)
    return formatter is not None and "image/png" in getattr(formatter, "active_types", ())


def show(fig: "Figure", dpi: int = 100) -> None:
    """Display the figure as a PNG image in the notebook, whatever matplotlib's backend; in a
    terminal, one line saying what the figure is and how to get it."""
    if shows_images():
        from IPython.display import Image, display

        display(Image(data=to_png(fig, dpi)))
    else:
        name = fig.get_suptitle() or ", ".join(a.get_title() for a in fig.axes if a.get_title())
        print(f"[figure: {name or 'untitled'}; images show in Jupyter; here: fig.savefig('x.png')]")
