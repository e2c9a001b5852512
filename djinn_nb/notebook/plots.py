"""Tables and figures of the breakpoint study, from plain records or DataFrames.

Each function takes a DataFrame, a list of dicts or a dict of lists with the
columns it documents, and returns a DataFrame (tables) or a matplotlib Figure
(figures; close it with ``plt.close(fig)`` when done). Nothing here talks to a
server: results come from :mod:`djinn_nb.notebook.metrics`, an experiment's JSON, or
anywhere else.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

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


def _figure(ncols: int = 1, width: float = 5.0, height: float = 3.4) -> tuple["Figure", Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
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


def plot_activation(tensor: "torch.Tensor", tokens: Sequence[str] | None = None, title: str = "") -> "Figure":
    """Two panels for a paused activation (batch, positions, hidden): per-position L2 norm, value histogram."""
    t = tensor.detach().float()
    per_pos = t[0] if t.dim() == 3 else t.reshape(-1, t.shape[-1])
    norms = per_pos.norm(dim=-1).tolist()
    fig, (ax1, ax2) = _figure(ncols=2, width=4.8)
    ax1.bar(range(len(norms)), norms, color="#4c72b0")
    if tokens is not None and len(tokens) == len(norms) and len(norms) <= 40:
        ax1.set_xticks(range(len(norms)), [repr(s)[1:-1] for s in tokens], rotation=60, ha="right", fontsize=7)
    ax1.set_xlabel("position")
    ax1.set_ylabel("L2 norm")
    ax1.set_title("norm per position")
    ax2.hist(t.flatten().numpy(), bins=80, color="#dd8452", log=True)
    ax2.set_xlabel("value")
    ax2.set_ylabel("count (log)")
    ax2.set_title("histogram of values")
    if title:
        fig.suptitle(title)
    return fig


def to_png(fig: "Figure", dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def show(fig: "Figure", dpi: int = 100) -> None:
    """Display the figure as a PNG image in the notebook, whatever matplotlib's backend."""
    from IPython.display import Image, display

    display(Image(data=to_png(fig, dpi)))
