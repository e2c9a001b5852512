"""HTML for runs, clients, paused activations and token comparisons.

Everything here reads the client API only and escapes every piece of text it
shows. Functions that need the server (decoding tokens) fall back to token ids
when the model has no tokenizer or the connection is gone.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch

    from ..client import Client, Run

__all__ = [
    "run_html",
    "client_html",
    "runs_html",
    "activation_table",
    "activation_html",
    "compare_html",
    "changed_positions",
    "Comparison",
    "token_strings",
    "decode_text",
    "format_bytes",
    "Activation",
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


def token_strings(client: "Client", ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own (``'#id'`` when the model has no tokenizer)."""
    from ..errors import DjinnError

    out = []
    for i in ids:
        try:
            out.append(client.decode([int(i)]))
        except DjinnError:
            out.append(f"#{int(i)}")
    return out


def decode_text(client: "Client", ids: Sequence[int]) -> str:
    """``client.decode(ids)``, or the ids joined by spaces when the model has no tokenizer."""
    from ..errors import DjinnError

    try:
        return client.decode([int(i) for i in ids])
    except DjinnError:
        return " ".join(str(int(i)) for i in ids)


def _run_text(run: "Run") -> str:
    from ..errors import DjinnError

    try:
        return run.text
    except DjinnError:
        return " ".join(str(t) for t in run.token_ids)


def run_html(run: "Run") -> str:
    """Where the run is, its tokens so far, the paused activation's shape/dtype and the bytes it holds."""
    s = run.summary
    if run.paused:
        where = f"paused after layer {run.layer} at step {run.step}"
        where += " (prompt pass)" if run.step == 0 else " (decoding)"
    else:
        where = run.state
    rows: list[tuple[str, str]] = [
        ("state", _e(where)),
        ("tokens so far", _e(f"{len(run.token_ids)} of {s.get('max_new_tokens', '?')}")),
        ("text", f"<pre style='margin:0;white-space:pre-wrap'>{_e(_run_text(run))}</pre>"),
    ]
    act = run.activation_stats
    if act:
        edited = " (edited)" if act.get("edited") else ""
        rows.append(("activation", _e(f"shape {tuple(act['shape'])}, {act['dtype']}{edited}, norm {act['norm']:.4g}")))
    rows.append(("bytes held", _e(format_bytes(run.bytes_held))))
    if s.get("breakpoints"):
        rows.append(("breakpoints", _e(", ".join(f"{b['layer']}:{b['step']}" for b in s["breakpoints"]))))
    if run.parent:
        rows.append(("forked from", _e(run.parent)))
    if run.timings_ms:
        rows.append(("timings", _e(", ".join(f"{k} {v:.2f} ms" for k, v in run.timings_ms.items()))))
    if run.error:
        rows.append(("error", _e(run.error)))
    return _table(rows, f"djinn run {run.id}")


def client_html(client: "Client") -> str:
    """The model, its shape, device and dtype, the server address and the client's live runs."""
    from ..errors import DjinnError

    i = client.info
    rows = [
        ("model", _e(i.get("model"))),
        ("architecture", _e(i.get("architecture", "?"))),
        ("layers", _e(f"{i.get('num_layers')} (breakpoint layers 0..{int(i.get('num_layers', 1)) - 1})")),
        ("hidden size", _e(i.get("hidden_size"))),
        ("device / dtype", _e(f"{i.get('device')} / {i.get('dtype')}")),
        ("tokenizer", _e("yes" if i.get("has_tokenizer", True) else "no: prompts are token-id lists")),
        ("server", _e(f"{client.address} (djinn_nb {i.get('server_version', '?')})")),
    ]
    try:
        runs = client.runs()
        rows.append(("runs", _e(f"{len(runs)} holding {format_bytes(sum(r['bytes_held'] for r in runs))}")))
    except DjinnError:
        rows.append(("runs", _e("unavailable (connection lost?)")))
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


def activation_table(stats: dict[str, Any], tokens: Sequence[str] | None = None) -> "pd.DataFrame":
    """Per-position statistics of a paused activation: position, token, norm, mean, max.

    ``stats`` is ``run.activation_stats``; ``tokens`` the text of each position, if known.
    """
    import pandas as pd

    n = len(stats["position_norm"])
    toks = list(tokens) if tokens is not None and len(tokens) == n else ["?"] * n
    return pd.DataFrame(
        {
            "position": range(n),
            "token": toks,
            "norm": stats["position_norm"],
            "mean": stats["position_mean"],
            "max": stats["position_max"],
        }
    )


def activation_html(stats: dict[str, Any], tokens: Sequence[str] | None = None, title: str = "activation") -> str:
    """A header line (shape, dtype, overall norm/mean/std) and the per-position table."""
    head = (
        f"shape {tuple(stats['shape'])}, {stats['dtype']}{' (edited)' if stats.get('edited') else ''}; "
        f"norm {stats['norm']:.4g}, mean {stats['mean']:.4g}, std {stats['std']:.4g}, "
        f"min {stats['min']:.4g}, max {stats['max']:.4g}"
    )
    table = activation_table(stats, tokens).to_html(index=False, float_format=lambda x: f"{x:.4g}", escape=True)
    return f"<div><b>{_e(title)}</b>: {_e(head)}{table}</div>"


@dataclass
class Activation:
    """A paused activation fetched to this machine, with its statistics and tokens.

    ``tensor`` is ``run.activation()``; the object shows itself as a table in a notebook.
    """

    run_id: str
    layer: int
    step: int
    tensor: "torch.Tensor"
    stats: dict[str, Any]
    tokens: list[str] = field(default_factory=list)

    def table(self) -> "pd.DataFrame":
        return activation_table(self.stats, self.tokens)

    def _repr_html_(self) -> str:
        title = f"run {self.run_id}, output of layer {self.layer} at step {self.step}"
        return activation_html(self.stats, self.tokens, title)

    def __repr__(self) -> str:
        return (
            f"<djinn Activation run {self.run_id} layer {self.layer} step {self.step} "
            f"{tuple(self.tensor.shape)} {str(self.tensor.dtype).replace('torch.', '')}>"
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
