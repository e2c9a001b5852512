"""HTML for runs, clients, paused activations and token comparisons.

Everything here reads the client API only and escapes every piece of text it
shows. Functions that need the server (decoding tokens) fall back to token ids
when the model has no tokenizer or the connection is gone. Tokens are decoded in
one call for any number of them (``client.decode_each``), never one call each: over
a real network every call is a round trip.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from ..conditions import to_text
from ..errors import DjinnError
from ..states import RunState
from ..wire.messages import RunSummary
from .compare import Comparison, changed_positions, compare_html

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
    "runs_rows",
    "RunsTable",
    "token_strings",
    "decode_text",
    "format_bytes",
    "Activation",
    "LensGrid",
    "Attention",
    "RESIDUAL_SITES",
]

_STYLE = "border-collapse:collapse;font-family:monospace;font-size:12px"
_CELL = "padding:2px 8px;text-align:left;vertical-align:top;border-bottom:1px solid #ddd"


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
    """Each token decoded on its own (``'#id'`` when the model has no tokenizer): one call to a
    client's ``decode_each`` for all of them (none for those it knows), else one ``decode`` each."""
    ids = [int(i) for i in ids]
    each = getattr(client, "decode_each", None)
    if each is not None:
        try:
            return list(each(ids))
        except DjinnError:
            return [f"#{i}" for i in ids]
    out = []
    for i in ids:
        try:
            out.append(client.decode([i]))
        except DjinnError:
            out.append(f"#{i}")
    return out


def decode_text(client: Decoder, ids: Sequence[int]) -> str:
    """``client.decode(ids)``, or the ids joined by spaces when the model has no tokenizer."""
    try:
        return client.decode([int(i) for i in ids])
    except DjinnError:
        return " ".join(str(int(i)) for i in ids)


#: The server's parts of a call, as the run card names them (in this order).
TIMING_NAMES = {"forward_to_pause": "forward to the pause", "fork_copy": "fork copy", "execute": "execute",
                "offload": "offload", "restore": "restore"}


def timings_text(timings_ms: dict[str, float]) -> str:
    """``forward to the pause 2703.12 ms, …``: each part named for what it measures."""
    order = [k for k in TIMING_NAMES if k in timings_ms] + [k for k in timings_ms if k not in TIMING_NAMES]
    return ", ".join(f"{TIMING_NAMES.get(k, k)} {timings_ms[k]:.2f} ms" for k in order)


def breakpoint_text(b: dict[str, Any]) -> str:
    """``layer 2 step all resid_post when entropy > 2.5`` (a condition as a tree or as text)."""
    when = b.get("when")
    if isinstance(when, dict):
        when = to_text(when)
    return (f"layer {b['layer']} step {b.get('step', 0)} {b.get('site', 'resid_post')}"
            + (f" when {when}" if when else ""))


def _value_text(term: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{term} {value:.4g}"
    return f"{term} {value}"


def held_text(held: dict[str, Any]) -> str:
    """``step 3: entropy > 2.5 held (entropy 2.912, step 3)``, one line per condition that held."""
    return "\n".join(
        f"step {held['step']}: {to_text(c['when'])} held at layer {c['layer']} {c['site']} "
        f"({', '.join(_value_text(t, v) for t, v in c['values'].items())})"
        for c in held.get("conditions", []))


class BreakpointList(list):
    """``%djinn_break``'s breakpoints: a list of dicts that reads as a sentence."""

    def __repr__(self) -> str:
        if not self:
            return "no breakpoints (add one: %djinn_break layer=6 [step=0|all] [site=...] [when=\"...\"])"
        return "breakpoints: " + "; ".join(breakpoint_text(b) for b in self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


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
    ]
    if s.token_ids:  # none yet while paused in the prompt pass
        rows.append(("text", f"<pre style='margin:0;white-space:pre-wrap'>{_e(text)}</pre>"))
    act = s.activation
    if act:
        edited = " (edited)" if act.get("edited") else ""
        rows.append(("activation", _e(f"shape {tuple(act['shape'])}, {act['dtype']}{edited}, norm {act['norm']:.4g}")))
    rows.append(("bytes held", _e(format_bytes(s.bytes_held))))
    if s.state == RunState.PAUSED and s.held:
        rows.append(("condition held", f"<pre style='margin:0;white-space:pre-wrap'>{_e(held_text(s.held))}</pre>"))
    if s.breakpoints:
        rows.append(("breakpoints", _e("; ".join(breakpoint_text(b) for b in s.breakpoints))))
    if s.parent:
        rows.append(("forked from", _e(s.parent)))
    if s.timings_ms:
        rows.append(("server time of the last call", _e(timings_text(s.timings_ms))))
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
    if i.get("threads") is not None:  # the server's CPU kernels (see djinn_nb/core/threads.py)
        rows.append(("CPU threads", _e(f"{i['threads']} (idle ones wait: {i.get('omp_wait_policy', '?')}; "
                                        "DJINN_THREADS / OMP_WAIT_POLICY set them)")))
    if runs is None:
        rows.append(("runs", _e("unavailable (connection lost?)")))
    else:
        rows.append(("runs", _e(f"{len(runs)} holding {format_bytes(sum(r['bytes_held'] for r in runs))}")))
    return _table(rows, "djinn client")


RUNS_COLUMNS = ("id", "state", "layer", "step", "tokens", "bytes held", "parent")


def runs_rows(runs: Sequence[dict[str, Any]]) -> list[list[str]]:
    """``client.runs()`` as text cells, as the run card writes them: bytes as ``192.0 KiB``, a
    missing value as ``-`` (one spelling, never ``None``/``NaN``/``<NA>``)."""
    def cell(r: dict[str, Any], c: str) -> str:
        v = r.get("bytes_held" if c == "bytes held" else c)
        if c == "bytes held":
            return format_bytes(v)
        return "-" if v is None or v == "" else str(v)

    return [[cell(r, c) for c in RUNS_COLUMNS] for r in runs]


def runs_html(runs: Sequence[dict[str, Any]]) -> str:
    """The server's list of runs (``client.runs()``) as a left-aligned table."""
    head = "".join(f"<th style='{_CELL}'>{_e(c)}</th>" for c in RUNS_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td style='{_CELL}'>{_e(v)}</td>" for v in row) + "</tr>"
                   for row in runs_rows(runs))
    if not runs:
        body = f"<tr><td style='{_CELL}' colspan='{len(RUNS_COLUMNS)}'>no runs</td></tr>"
    return f"<table style='{_STYLE}'><tr>{head}</tr>{body}</table>"


class RunsTable(list):
    """``%djinn_runs``'s result: the rows of ``client.runs()`` (plain dicts), shown as the run
    card writes them; ``.frame()`` is a DataFrame of the raw values (bytes as integers)."""

    def frame(self) -> "pd.DataFrame":
        import pandas as pd

        cols = ["id", "state", "layer", "step", "tokens", "bytes_held", "parent"]
        return pd.DataFrame(list(self), columns=cols).astype({"layer": "Int64", "step": "Int64"})

    def _repr_html_(self) -> str:
        return runs_html(self)

    def __repr__(self) -> str:
        rows = [list(RUNS_COLUMNS)] + runs_rows(self)
        widths = [max(len(r[i]) for r in rows) for i in range(len(RUNS_COLUMNS))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


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
    """Per-position statistics of a paused activation, indexed by position: token, norm, mean, max
    (and ``lens``: the top tokens of the logit lens with their probabilities, when given).

    ``stats`` is ``run.activation_stats`` (or any dict with ``position_norm``, ``position_mean``,
    ``position_max``); ``tokens`` the text of each position, if known; ``lens`` per position a
    list of ``(token text, probability)``.
    """
    import pandas as pd

    n = len(stats["position_norm"])
    toks = list(tokens) if tokens is not None and len(tokens) == n else ["?"] * n
    columns: dict[str, Any] = {
        "token": toks,
        "norm": stats["position_norm"],
        "mean": stats["position_mean"],
        "max": stats["position_max"],
    }
    if lens is not None and len(lens) == n:
        columns["lens (top tokens, probability)"] = [lens_text(e) for e in lens]
    return pd.DataFrame(columns, index=pd.RangeIndex(n, name="position"))


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
    table = activation_table(per_position or stats, tokens, lens).reset_index().to_html(
        index=False, float_format=lambda x: f"{x:.4g}", escape=True, justify="left")
    table = table.replace("<table ", "<table style='text-align:left' ", 1)
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
