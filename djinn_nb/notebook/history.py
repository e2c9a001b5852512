"""A run's token history as text you can read at a glance: entropy as colour, alternatives on hover.

``TokenHistory(run.history())`` shows the generated text, each token shaded by the
entropy of the distribution it was chosen from (white: sure; deep orange: unsure),
with its step number and top-k alternatives in a hover card — plain HTML and CSS,
nothing to install in JupyterLab. The step numbers are what ``run.rewind(step)``
and ``%djinn_rewind step=N`` take. In a terminal it prints a table instead.
"""
from __future__ import annotations

import html
from typing import Any, Sequence

__all__ = ["TokenHistory", "visible"]

#: Characters that would render as nothing (or as a bare line break) in the history, as symbols.
VISIBLE = {"\n": "⏎", "\r": "␍", "\t": "⇥"}
CARD_LINE_PX = 16  # one line of the hover card (11 px text, line-height 1.4, rounded up)


def visible(text: str) -> str:
    """A token's text with newlines, carriage returns and tabs as symbols (``⏎``, ``␍``, ``⇥``)
    and the empty text as ``∅``, so that every token has a width to hover."""
    if text == "":
        return "∅"
    return "".join(VISIBLE.get(ch, ch) for ch in text)

_CSS = """
<style>
.djinn-hist { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; line-height: 2.1; text-align: left; }
.djinn-hist .tok { position: relative; padding: 1px 0; border-radius: 3px; white-space: pre-wrap; cursor: default; }
.djinn-hist .tok .card { display: none; position: absolute; left: 0; top: 1.8em; z-index: 10; min-width: 11em;
  background: #fff; color: #222; border: 1px solid #bbb; border-radius: 4px; padding: 4px 6px;
  box-shadow: 0 2px 6px rgba(0,0,0,.2); font-size: 11px; line-height: 1.4; white-space: pre; }
.djinn-hist .tok:hover .card { display: block; }
.djinn-hist .tok:hover { outline: 1px solid #555; }
.djinn-hist .legend { font-size: 11px; color: #555; margin-top: .4em; }
</style>
"""


def _colour(entropy: float, top: float) -> str:
    """White at zero entropy to deep orange at ``top`` nats (or more)."""
    x = 0.0 if top <= 0 else max(0.0, min(1.0, entropy / top))
    r, g, b = 255, int(255 - 125 * x), int(255 - 235 * x)
    return f"rgb({r},{g},{b})"


class TokenHistory:
    """``run.history()`` records, shown as coloured text (notebook) or a table (terminal)."""

    def __init__(self, records: Sequence[dict[str, Any]], prompt: str | None = None, decode: Any = None):
        self.records = list(records)
        self.prompt = prompt
        self._decode = decode

    def _text(self, token_id: int, record: dict[str, Any]) -> str:
        if "token" in record:
            return record["token"]
        if self._decode is not None:
            return self._decode([token_id])
        return f"[{token_id}]"

    def _alt(self, record: dict[str, Any], i: int) -> str:
        if "topk_tokens" in record:
            return record["topk_tokens"][i]
        return self._text(record["topk"][i][0], {})

    def _repr_html_(self) -> str:
        if not self.records:
            return "<div class='djinn-hist'><i>no tokens generated yet</i></div>"
        top = max(max(r["entropy"] for r in self.records), 1e-9)
        spans = []
        for r in self.records:
            alts = "\n".join(
                f"{'→' if i == 0 else ' '} {html.escape(repr(self._alt(r, i)))[:40]:<18} {p:6.1%}"
                for i, (_, p) in enumerate(r["topk"])
            )
            card = f"step {r['step']}  ·  entropy {r['entropy']:.2f} nats\n{alts}\n%djinn_rewind step={r['step']}"
            text = self._text(r["token_id"], r)
            spans.append(
                f"<span class='tok' style='background:{_colour(r['entropy'], top)}' data-step='{r['step']}'>"
                f"{html.escape(visible(text))}<span class='card'>{card}</span></span>"
                + ("<br>" if "\n" in text else "")  # the symbol shows the newline; the break keeps the layout
            )
        prompt = f"<span style='color:#777'>{html.escape(self.prompt)}</span>" if self.prompt else ""
        legend = (f"<div class='legend'>colour: entropy of the distribution each token was chosen from "
                  f"(white 0 → orange {top:.2f} nats, this run's highest); hover a token for its step and "
                  f"top-{len(self.records[0]['topk'])} alternatives</div>")
        # room below the text for the card of a token on the last line: an output area clips what
        # overflows it (the card has the header, k alternatives and the %djinn_rewind line)
        room = (len(self.records[0]["topk"]) + 3) * CARD_LINE_PX + 16
        return (f"{_CSS}<div class='djinn-hist' style='padding-bottom:{room}px'>{prompt}{''.join(spans)}"
                f"{legend}</div>")

    def __repr__(self) -> str:
        lines = [f"{'step':>4}  {'token':<18} {'entropy':>7}  top-k"]
        for r in self.records:
            alts = ", ".join(f"{self._alt(r, i)!r} {p:.2f}" for i, (_, p) in enumerate(r["topk"][:3]))
            lines.append(f"{r['step']:>4}  {self._text(r['token_id'], r)!r:<18} {r['entropy']:>7.3f}  {alts}")
        return "\n".join(lines)

    @property
    def most_uncertain(self) -> int | None:
        """The step with the highest entropy (a good place to rewind to)."""
        if not self.records:
            return None
        return max(self.records, key=lambda r: (r["entropy"], -r["step"]))["step"]

