"""HTML for runs, clients, paused activations and token comparisons.

Everything here reads the client API only and escapes every piece of text it
shows. Functions that need the server (decoding tokens) fall back to token ids
when the model has no tokenizer or the connection is gone.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from ..errors import DjinnError
from ..schema import RunState, RunSummary

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch


class Decoder(Protocol):
    """Anything that turns token ids into text (a ``Client``)."""

    def decode(self, ids: Sequence[int]) -> str: ...

__all__ = [
    "run_html",
    "client_html",
    "runs_html",
    "activation_table",
    "activation_html",
    "lens_text",
    "compare_html",
    "changed_positions",
    "Comparison",
    "token_strings",
    "decode_text",
    "format_bytes",
    "Activation",
    "LensGrid",
    "Attention",
    "RESIDUAL_SITES",
]

_STYLE = "border-collapse:collapse;font-family:monospace;font-size:12px"
_CELL = "padding:2px 8px;text-align:left;border-bottom:1px solid #ddd"
_MARK = "background:#ffe08a;border-radius:2px"


def _e(value: Any) -> str:
    return html.escape(str(value))


def format_bytes(n: int | float | None) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _table(rows: Sequence[tuple[str, str]], title: str) -> str:
    """A two-column key/value table; values are already-escaped HTML."""
    body = "".join(f"<tr><th style='{_CELL}'>{_e(k)}</th><td style='{_CELL}'>{v}</td></tr>" for k, v in rows)
    return f"<div><b>{_e(title)}</b><table style='{_STYLE}'>{body}</table></div>"


def token_strings(client: Decoder, ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own (``'#id'`` when the model has no tokenizer)."""
    out = []
    for i in ids:
        try:
            out.append(client.decode([int(i)]))
        except DjinnError:
            out.append(f"#{int(i)}")
    return out


def decode_text(client: Decoder, ids: Sequence[int]) -> str:
    """``client.decode(ids)``, or the ids joined by spaces when the model has no tokenizer."""
    try:
        return client.decode([int(i) for i in ids])
    except DjinnError:
        return " ".join(str(int(i)) for i in ids)


def run_html(s: RunSummary, decoder: Decoder | None = None) -> str:
    """Where the run is, its tokens so far, the paused activation's shape/dtype and the bytes it holds."""
    if s.state == RunState.PAUSED:
        where = f"paused at layer {s.layer} ({s.site}) at step {s.step}"
        where += " (prompt pass)" if s.step == 0 else " (decoding)"
    else:
        where = str(s.state)
    text = decode_text(decoder, s.token_ids) if decoder is not None else " ".join(map(str, s.token_ids))
    rows: list[tuple[str, str]] = [
        ("state", _e(where)),
        ("tokens so far", _e(f"{len(s.token_ids)} of {s.max_new_tokens}")),
        ("text", f"<pre style='margin:0;white-space:pre-wrap'>{_e(text)}</pre>"),
    ]
    act = s.activation
    if act:
        edited = " (edited)" if act.get("edited") else ""
        rows.append(("activation", _e(f"shape {tuple(act['shape'])}, {act['dtype']}{edited}, norm {act['norm']:.4g}")))
    rows.append(("bytes held", _e(format_bytes(s.bytes_held))))
    if s.breakpoints:
        rows.append(("breakpoints", _e(", ".join(f"{b['layer']}:{b['step']}:{b.get('site', 'resid_post')}"
                                                 for b in s.breakpoints))))
    if s.parent:
        rows.append(("forked from", _e(s.parent)))
    if s.timings_ms:
        rows.append(("timings", _e(", ".join(f"{k} {v:.2f} ms" for k, v in s.timings_ms.items()))))
    if s.error:
        rows.append(("error", _e(s.error)))
    return _table(rows, f"djinn run {s.id}")


def client_html(info: dict[str, Any], address: str, runs: Sequence[dict[str, Any]] | None) -> str:
    """The model, its shape, device and dtype, the server address and the client's live runs
    (``runs=None``: they could not be listed)."""
    i = info
    rows = [
        ("model", _e(i.get("model"))),
        ("architecture", _e(i.get("architecture", "?"))),
        ("layers", _e(f"{i.get('num_layers')} (breakpoint layers 0..{int(i.get('num_layers', 1)) - 1})")),
        ("hidden size", _e(i.get("hidden_size"))),
        ("device / dtype", _e(f"{i.get('device')} / {i.get('dtype')}")),
        ("tokenizer", _e("yes" if i.get("has_tokenizer", True) else "no: prompts are token-id lists")),
        ("server", _e(f"{address} (djinn_nb {i.get('server_version', '?')})")),
    ]
    if runs is None:
        rows.append(("runs", _e("unavailable (connection lost?)")))
    else:
        rows.append(("runs", _e(f"{len(runs)} holding {format_bytes(sum(r['bytes_held'] for r in runs))}")))
    return _table(rows, "djinn client")


def runs_html(runs: Sequence[dict[str, Any]]) -> str:
    """The server's list of runs (``client.runs()``) as a table."""
    cols = ["id", "state", "layer", "step", "tokens", "bytes_held", "parent"]
    head = "".join(f"<th style='{_CELL}'>{_e(c)}</th>" for c in cols)
    body = ""
    for r in runs:
        cells = [format_bytes(r.get(c)) if c == "bytes_held" else ("-" if r.get(c) is None else r.get(c)) for c in cols]
        body += "<tr>" + "".join(f"<td style='{_CELL}'>{_e(v)}</td>" for v in cells) + "</tr>"
    return f"<table style='{_STYLE}'><tr>{head}</tr>{body}</table>"


def _per_position(tensor: "torch.Tensor") -> dict[str, list[float]]:
    """norm/mean/max per position of batch 0 (at ``z``, over all heads together)."""
    t = tensor.detach().float()
    t = t[0].flatten(1) if t.dim() >= 3 else t.reshape(-1, t.shape[-1])
    return {"position_norm": t.norm(dim=-1).tolist(), "position_mean": t.mean(dim=-1).tolist(),
            "position_max": t.max(dim=-1).values.tolist()}


def lens_text(entries: Sequence[tuple[str, float]]) -> str:
    """``[(' Paris', 0.41), (' the', 0.12)]`` → ``"' Paris' 0.41 · ' the' 0.12"``."""
    return " · ".join(f"{tok!r} {p:.2f}" for tok, p in entries)


def activation_table(
    stats: dict[str, Any],
    tokens: Sequence[str] | None = None,
    lens: Sequence[Sequence[tuple[str, float]]] | None = None,
) -> "pd.DataFrame":
    """Per-position statistics of a paused activation: position, token, norm, mean, max
    (and ``lens``: the top tokens of the logit lens with their probabilities, when given).

    ``stats`` is ``run.activation_stats`` (or any dict with ``position_norm``, ``position_mean``,
    ``position_max``); ``tokens`` the text of each position, if known; ``lens`` per position a
    list of ``(token text, probability)``.
    """
    import pandas as pd

    n = len(stats["position_norm"])
    toks = list(tokens) if tokens is not None and len(tokens) == n else ["?"] * n
    columns: dict[str, Any] = {
        "position": range(n),
        "token": toks,
        "norm": stats["position_norm"],
        "mean": stats["position_mean"],
        "max": stats["position_max"],
    }
    if lens is not None and len(lens) == n:
        columns["lens (top tokens, probability)"] = [lens_text(e) for e in lens]
    return pd.DataFrame(columns)


def activation_html(
    stats: dict[str, Any],
    tokens: Sequence[str] | None = None,
    title: str = "activation",
    lens: Sequence[Sequence[tuple[str, float]]] | None = None,
    note: str = "",
    per_position: dict[str, Any] | None = None,
) -> str:
    """A header line (shape, dtype, overall norm/mean/std), the per-position table (with the
    lens, when given) and a note (e.g. why there is no lens)."""
    head = (
        f"shape {tuple(stats['shape'])}, {stats['dtype']}{' (edited)' if stats.get('edited') else ''}; "
        f"norm {stats['norm']:.4g}, mean {stats['mean']:.4g}, std {stats['std']:.4g}, "
        f"min {stats['min']:.4g}, max {stats['max']:.4g}"
    )
    table = activation_table(per_position or stats, tokens, lens).to_html(
        index=False, float_format=lambda x: f"{x:.4g}", escape=True)
    tail = f"<div style='font-size:12px'>{_e(note)}</div>" if note else ""
    return f"<div><b>{_e(title)}</b>: {_e(head)}{table}{tail}</div>"


@dataclass
class Activation:
    """A paused activation fetched to this machine, with its statistics and tokens.

    ``tensor`` is ``run.activation()``; the object shows itself as a table in a notebook.
    At a residual-stream site, ``lens`` is ``run.lens(k)`` (per position, ``(token_id, probability)``)
    and ``lens_tokens`` the same with token text; elsewhere ``lens_note`` says why there is none.
    """

    run_id: str
    layer: int
    step: int
    tensor: "torch.Tensor"
    stats: dict[str, Any]
    tokens: list[str] = field(default_factory=list)
    site: str = "resid_post"
    lens: list[list[tuple[int, float]]] | None = None
    lens_tokens: list[list[tuple[str, float]]] | None = None
    lens_note: str = ""

    def _per_position(self) -> dict[str, Any]:
        # at z the server's per-position statistics run over (position, head) rows; recompute per position
        return _per_position(self.tensor) if self.tensor.dim() == 4 else self.stats

    def table(self) -> "pd.DataFrame":
        return activation_table(self._per_position(), self.tokens, self.lens_tokens)

    def _repr_html_(self) -> str:
        where = "output of layer" if self.site == "resid_post" else f"{self.site} of layer"
        title = f"run {self.run_id}, {where} {self.layer} at step {self.step}"
        return activation_html(self.stats, self.tokens, title, self.lens_tokens, self.lens_note,
                               self._per_position())

    def __repr__(self) -> str:
        note = f"; {self.lens_note}" if self.lens_note else ""
        return (
            f"<djinn Activation run {self.run_id} layer {self.layer} {self.site} step {self.step} "
            f"{tuple(self.tensor.shape)} {str(self.tensor.dtype).replace('torch.', '')}{note}>"
        )


def _token_spans(tokens: Sequence[str], changed: Sequence[bool]) -> str:
    return "".join(
        f"<span style='{_MARK}'>{_e(t)}</span>" if c else f"<span>{_e(t)}</span>" for t, c in zip(tokens, changed)
    )


def changed_positions(baseline: Sequence[int], other: Sequence[int]) -> list[bool]:
    """For each token of ``other``: does it differ from ``baseline`` at that position?"""
    return [i >= len(baseline) or t != baseline[i] for i, t in enumerate(other)]


def compare_html(
    baseline_tokens: Sequence[str],
    baseline_ids: Sequence[int],
    tokens: Sequence[str],
    ids: Sequence[int],
    label: str,
    note: str = "",
) -> str:
    """The baseline continuation beside another one, the other's changed tokens highlighted."""
    changed = changed_positions(baseline_ids, ids)
    n_changed = sum(changed) + max(0, len(baseline_ids) - len(ids))
    total = max(len(ids), len(baseline_ids)) or 1
    pre = "margin:0;white-space:pre-wrap;font-family:monospace"
    cell = "vertical-align:top;padding:4px 10px;width:50%"
    summary = f"{n_changed} of {total} tokens changed"
    if note:
        summary += f"; {note}"
    return (
        f"<table style='border-collapse:collapse;width:100%'><tr>"
        f"<th style='{cell}'>baseline (unmodified)</th><th style='{cell}'>{_e(label)}</th></tr><tr>"
        f"<td style='{cell}'><pre style='{pre}'>{_token_spans(baseline_tokens, [False] * len(baseline_tokens))}</pre></td>"
        f"<td style='{cell}'><pre style='{pre}'>{_token_spans(tokens, changed)}</pre></td>"
        f"</tr></table><div style='font-size:12px'>{_e(summary)}</div>"
    )


@dataclass
class Comparison:
    """A continuation next to the unmodified one; HTML in a notebook, two lines of text elsewhere."""

    baseline_ids: list[int]
    baseline_tokens: list[str]
    token_ids: list[int]
    tokens: list[str]
    label: str
    note: str = ""

    @property
    def changed(self) -> int:
        """How many positions differ (a length difference counts)."""
        return sum(changed_positions(self.baseline_ids, self.token_ids)) + max(
            0, len(self.baseline_ids) - len(self.token_ids)
        )

    def _repr_html_(self) -> str:
        return compare_html(self.baseline_tokens, self.baseline_ids, self.tokens, self.token_ids, self.label, self.note)

    def __repr__(self) -> str:
        return (
            f"baseline: {''.join(self.baseline_tokens)!r}\n{self.label}: {''.join(self.tokens)!r} "
            f"({self.changed} of {max(len(self.token_ids), len(self.baseline_ids))} tokens changed)"
        )


RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post")


@dataclass
class LensGrid:
    """The logit lens at every layer for one prompt pass (``client.lens_grid``), with token text.

    ``ids``/``probs``: (layers, positions, k); ``tokens``: the text of each prompt position;
    ``top_tokens``: (layers × positions) the text of each cell's top-1 token.
    """

    ids: "torch.Tensor"
    probs: "torch.Tensor"
    tokens: list[str]
    top_tokens: list[list[str]]
    site: str = "resid_post"

    def table(self) -> "pd.DataFrame":
        """The top-1 token per layer (rows) and position (columns)."""
        import pandas as pd

        return pd.DataFrame(self.top_tokens, columns=[f"{i}: {t!r}" for i, t in enumerate(self.tokens)]).rename_axis("layer")

    def plot(self, title: str | None = None) -> Any:
        from .plots import plot_lens_grid

        return plot_lens_grid({"ids": self.ids, "probs": self.probs}, self.tokens, labels=self.top_tokens,
                              title=title or f"logit lens at {self.site}")

    def __repr__(self) -> str:
        layers, positions, k = self.ids.shape
        return f"<djinn LensGrid {self.site}: {layers} layers × {positions} positions, top-{k}>"


@dataclass
class Attention:
    """A paused block's attention pattern (``run.attention()``), with the tokens of its axes."""

    run_id: str
    layer: int
    step: int
    tensor: "torch.Tensor"  # (batch, heads, queries, keys)
    key_tokens: list[str] | None = None
    query_tokens: list[str] | None = None

    @property
    def num_heads(self) -> int:
        return int(self.tensor.shape[1])

    def plot(self, head: int | Sequence[int] | None = None) -> Any:
        """One heatmap per head (or the heads asked for)."""
        from .plots import plot_attention

        title = f"run {self.run_id}: attention of layer {self.layer}, step {self.step}"
        return plot_attention(self.tensor, self.key_tokens, self.query_tokens, head=head, title=title)

    def __repr__(self) -> str:
        return (f"<djinn Attention run {self.run_id} layer {self.layer} step {self.step} "
                f"(batch, heads, queries, keys)={tuple(self.tensor.shape)}>")
