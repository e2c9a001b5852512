"""Two continuations side by side, aligned by tokens.

A steered continuation often says the same thing one token later, or drops a
token: comparing position by position would then mark everything after it as
changed. Here the two token-id lists are aligned (``difflib``'s longest matching
blocks), and each token is shown as kept, replaced, inserted or deleted.

**Tokens changed** has one definition, :func:`tokens_changed`, used by the slider,
``%djinn_resume``'s comparison and ``make demo``: over the alignment, a replaced pair
counts once and an inserted or deleted token once each, out of the aligned length.
(``metrics.token_change_rate`` is the study's *positional* rate, kept for exp3.) Every
piece of text is escaped; tables are left-aligned explicitly (JupyterLab's
rendered-HTML style right-aligns table cells).
"""
from __future__ import annotations

import difflib
import html
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["Op", "align", "changed_count", "tokens_changed", "compare_html", "changed_positions", "Comparison",
           "INSERT_STYLE", "DELETE_STYLE"]

# the steered side's new tokens (replaced or inserted) carry INSERT_STYLE, the baseline's lost ones DELETE_STYLE
INSERT_STYLE = "background:#ffe08a;border-radius:2px"
DELETE_STYLE = "background:#f8c9c9;text-decoration:line-through;border-radius:2px"
_LEFT = "text-align:left;vertical-align:top;padding:4px 10px"
_PRE = "margin:0;white-space:pre-wrap;font-family:monospace;text-align:left"


@dataclass(frozen=True)
class Op:
    """One step of the alignment: ``kind`` is equal, replace, insert or delete; ``a``/``b`` the
    index ranges (start, stop) in the baseline and in the other continuation."""

    kind: str
    a: tuple[int, int]
    b: tuple[int, int]


def align(baseline: Sequence[int], other: Sequence[int]) -> list[Op]:
    """The token alignment of ``other`` against ``baseline`` (no junk heuristics: short lists)."""
    m = difflib.SequenceMatcher(None, list(baseline), list(other), autojunk=False)
    return [Op(k, (i1, i2), (j1, j2)) for k, i1, i2, j1, j2 in m.get_opcodes()]


def changed_count(ops: Sequence[Op]) -> tuple[int, int]:
    """(tokens changed, aligned length): a replaced pair counts once, an insertion or deletion once each."""
    changed = total = 0
    for op in ops:
        n = max(op.a[1] - op.a[0], op.b[1] - op.b[0])
        total += n
        changed += 0 if op.kind == "equal" else n
    return changed, total


def tokens_changed(baseline: Sequence[int], other: Sequence[int]) -> tuple[int, int]:
    """(tokens changed, aligned length) of ``other`` against ``baseline``: the one definition."""
    return changed_count(align(baseline, other))


def changed_positions(baseline: Sequence[int], other: Sequence[int]) -> list[bool]:
    """For each token of ``other``: is it outside the alignment's kept blocks (replaced or inserted)?"""
    out = [True] * len(other)
    for op in align(baseline, other):
        if op.kind == "equal":
            out[op.b[0]:op.b[1]] = [False] * (op.b[1] - op.b[0])
    return out


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _span(token: str, style: str = "", title: str = "") -> str:
    s = f" style='{style}'" if style else ""
    t = f" title='{_e(title)}'" if title else ""
    return f"<span{s}{t}>{_e(token)}</span>"


def _alt_title(alternatives: Sequence[Sequence[tuple[str, float]]] | None, j: int) -> str:
    if not alternatives or j >= len(alternatives) or not alternatives[j]:
        return ""
    return "top: " + ", ".join(f"{t!r} {p:.2f}" for t, p in alternatives[j])


def _sides(ops: Sequence[Op], base: Sequence[str], other: Sequence[str],
           alternatives: Sequence[Sequence[tuple[str, float]]] | None) -> tuple[str, str]:
    left, right = [], []
    for op in ops:
        for i in range(*op.a):
            left.append(_span(base[i], "" if op.kind == "equal" else DELETE_STYLE))
        for j in range(*op.b):
            style = "" if op.kind == "equal" else INSERT_STYLE
            was = ""
            if op.kind == "replace" and op.a[0] + (j - op.b[0]) < op.a[1]:
                was = f"was {base[op.a[0] + (j - op.b[0])]!r}"
            title = "; ".join(x for x in (was, "inserted" if op.kind == "insert" else "",
                                          _alt_title(alternatives, j)) if x)
            right.append(_span(other[j], style, title))
    return "".join(left), "".join(right)


def compare_html(
    baseline_tokens: Sequence[str],
    baseline_ids: Sequence[int],
    tokens: Sequence[str],
    ids: Sequence[int],
    label: str,
    note: str = "",
    prompt: str | None = None,
    alternatives: Sequence[Sequence[tuple[str, float]]] | None = None,
) -> str:
    """The prompt, then the baseline continuation beside another one, aligned by tokens: the
    other's replaced/inserted tokens highlighted, the baseline's replaced/deleted ones struck
    through. ``alternatives``: per token of the other, its top-k (text, probability), shown on hover."""
    ops = align(baseline_ids, ids)
    changed, total = changed_count(ops)
    kinds = {k: sum(max(o.a[1] - o.a[0], o.b[1] - o.b[0]) for o in ops if o.kind == k)
             for k in ("replace", "insert", "delete")}
    past = {"replace": "replaced", "insert": "inserted", "delete": "deleted"}
    detail = ", ".join(f"{n} {past[k]}" for k, n in kinds.items() if n)
    summary = f"{changed} of {max(total, 1)} tokens changed" + (f" ({detail})" if detail else "")
    if note:
        summary += f"; {note}"
    left, right = _sides(ops, baseline_tokens, tokens, alternatives)
    head = (f"<div style='{_PRE};color:#555'>prompt: <b>{_e(prompt)}</b></div>" if prompt is not None else "")
    return (
        f"<div class='djinn-compare' style='text-align:left'>{head}"
        f"<table style='border-collapse:collapse;width:100%;table-layout:fixed;margin:0'><tr>"
        f"<th style='{_LEFT};width:50%'>baseline (unmodified)</th><th style='{_LEFT};width:50%'>{_e(label)}</th></tr><tr>"
        f"<td style='{_LEFT}'><pre style='{_PRE}'>{left}</pre></td>"
        f"<td style='{_LEFT}'><pre style='{_PRE}'>{right}</pre></td>"
        f"</tr></table><div class='djinn-summary' style='font-size:12px;text-align:left'>{_e(summary)}</div></div>"
    )


@dataclass
class Comparison:
    """A continuation next to the unmodified one, aligned by tokens; HTML in a notebook, two lines
    of text elsewhere."""

    baseline_ids: list[int]
    baseline_tokens: list[str]
    token_ids: list[int]
    tokens: list[str]
    label: str
    note: str = ""
    prompt: str | None = None
    alternatives: list[list[tuple[str, float]]] | None = field(default=None, repr=False)

    @property
    def changed(self) -> int:
        """How many tokens differ under the alignment (replaced, inserted or deleted)."""
        return changed_count(align(self.baseline_ids, self.token_ids))[0]

    @property
    def total(self) -> int:
        return changed_count(align(self.baseline_ids, self.token_ids))[1]

    def _repr_html_(self) -> str:
        return compare_html(self.baseline_tokens, self.baseline_ids, self.tokens, self.token_ids, self.label,
                            self.note, self.prompt, self.alternatives)

    def __repr__(self) -> str:
        head = f"prompt: {self.prompt!r}\n" if self.prompt is not None else ""
        return (
            f"{head}baseline: {''.join(self.baseline_tokens)!r}\n{self.label}: {''.join(self.tokens)!r} "
            f"({self.changed} of {self.total} tokens changed)"
        )
