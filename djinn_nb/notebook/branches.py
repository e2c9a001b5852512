"""Two branches shown side by side: ``%djinn_diff a b`` and :class:`DiffView`.

Why a view of its own: what a user wants after forking or rewinding is to *see* where the two
branches part and how far their states drift — the texts aligned with the first differing token
marked, a layer × step heatmap of the distance between their states, the KL per step, what each
would have said at the divergence (top-k and logit lens) — and then to go back to a step and look
closer. Everything comes from one ``djinn_nb.diff`` reply (texts included); the heatmap is a
static PNG (it survives a saved or headless notebook), and a step and layer chosen in two
dropdowns rewind either branch there (a button per branch: clicking a PNG is not portable).
"""
from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from . import magic_args as A
from ..client import Diff, Run, diff
from .compare import DELETE_STYLE, INSERT_STYLE
from .usage import usage_errors

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["BranchMagics", "DiffView", "diff_html", "plot_diff"]

_CELL = "text-align:left;vertical-align:top;padding:3px 8px"
_MONO = "font-family:monospace;white-space:pre-wrap"
_SHARED = "color:#555"


def _text(d: Diff, token: int) -> str:
    return d.texts.get(token, f"#{token}")


def _row(label: str, d: Diff, tokens: list[int], start: int, style: str) -> str:
    """A branch's tokens from ``start`` on, the first one marked with ``style``."""
    spans = []
    for i, t in enumerate(tokens[start:]):
        css = f' style="{style}"' if i == 0 and style else ""
        spans.append(f'<span title="step {start + i}, id {t}"{css}>{html.escape(_text(d, t))}</span>')
    return (f'<tr><td style="{_CELL}"><b>{html.escape(label)}</b></td>'
            f'<td style="{_CELL};{_MONO}">{"".join(spans) or "<i>(nothing)</i>"}</td></tr>')


def _pairs_html(d: Diff, rows: list[tuple[int, float]]) -> str:
    return ", ".join(f"{html.escape(repr(_text(d, i)))} {p:.3f}" for i, p in rows) or "—"


def diff_html(d: Diff) -> str:
    """The two texts aligned (the shared part once, then each branch from the divergence, its first
    token marked), and at the divergence each branch's top-k and top-1 logit lens per layer."""
    r = d.reply
    split = r.divergence if r.divergence is not None else min(len(r.tokens_a), len(r.tokens_b))
    shared = "".join(html.escape(_text(d, t)) for t in r.tokens_a[:split])
    head = (f"<b>diff</b> {html.escape(r.a)} (a) vs {html.escape(r.b)} (b): "
            + ("no divergence" if r.divergence is None else f"tokens part at <b>step {r.divergence}</b>")
            + f"; {len(r.layers)} layers × {len(r.steps)} steps at {html.escape(r.site)}")
    unrep = [f"{name}: steps {steps}" for name, steps in (("a", r.unreproduced_a), ("b", r.unreproduced_b)) if steps]
    note = (f'<div style="color:#a60">not recomputable (an edit in that step; watch those layers): '
            f'{html.escape("; ".join(unrep))}</div>') if unrep else ""
    parts = [f"<div>{head}</div>{note}", '<table style="border-collapse:collapse">',
             f'<tr><td style="{_CELL}"><b>shared</b></td><td style="{_CELL};{_MONO};{_SHARED}">{shared}</td></tr>',
             _row("a", d, r.tokens_a, split, DELETE_STYLE.replace(";text-decoration:line-through", "")),
             _row("b", d, r.tokens_b, split, INSERT_STYLE), "</table>"]
    if d.topk is not None:
        top_a, top_b = d.topk
        parts.append(f'<div style="margin-top:6px">top-k at step {r.divergence}: a: {_pairs_html(d, top_a)}'
                     f' &nbsp;|&nbsp; b: {_pairs_html(d, top_b)}</div>')
    if d.lens is not None:
        lens_a, lens_b = d.lens
        cells = "".join(f'<tr><td style="{_CELL}">{layer}</td><td style="{_CELL}">{_pairs_html(d, a[:1])}</td>'
                        f'<td style="{_CELL}">{_pairs_html(d, b[:1])}</td></tr>'
                        for layer, a, b in zip(r.layers, lens_a, lens_b))
        parts.append(f'<details><summary>logit lens at step {r.divergence} (top-1 per layer)</summary>'
                     f'<table style="border-collapse:collapse"><tr><th style="{_CELL}">layer</th>'
                     f'<th style="{_CELL}">a</th><th style="{_CELL}">b</th></tr>{cells}</table></details>')
    return "".join(parts)


def plot_diff(d: Diff, relative: bool = False) -> "Figure":
    """The distance as a layer × step heatmap (unknown cells grey, the divergence a dashed line),
    the KL per step beneath it. ``relative``: distance over the norm of branch a's state."""
    from .plots import figure_class

    grid = d.distance_tensor(relative).numpy()
    steps, layers = d.steps, d.layers
    fig = figure_class()(figsize=(max(5.0, 1.8 + 0.35 * len(steps)), 2.2 + 0.22 * len(layers)))
    ax, kl_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [4, 1]})
    import matplotlib

    cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="#cccccc")
    image = ax.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest", origin="lower",
                      extent=(-0.5, len(steps) - 0.5, -0.5, len(layers) - 0.5))
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=[ax, kl_ax], label=("relative " if relative else "") + f"distance at {d.site}")
    kl = [math.nan if x is None else x for x in d.kl]
    kl_ax.bar(range(len(steps)), kl, color="#555")
    kl_ax.set_ylabel("KL(a‖b)", fontsize=8)
    kl_ax.set_xticks(range(len(steps)), [str(s) for s in steps])
    kl_ax.set_xlabel("step")
    if d.divergence is not None and d.divergence in steps:
        for a in (ax, kl_ax):
            a.axvline(steps.index(d.divergence), color="#1f77b4", linestyle="--", linewidth=1.2)
    ax.set_title(f"{d.reply.a} vs {d.reply.b}" + ("" if d.divergence is None else f": part at step {d.divergence}"),
                 fontsize=10)
    return fig


class DiffView:
    """The aligned texts, the heatmap, and a step/layer choice that rewinds either branch there.

    ``rewound`` is the last run a button made; ``on_rewind(run)`` (if given) is told of it too."""

    def __init__(self, d: Diff, relative: bool = False, on_rewind: Callable[[Run], None] | None = None):
        import ipywidgets as w

        from .plots import to_png

        self.diff, self.on_rewind = d, on_rewind
        self.rewound: Run | None = None
        default = d.divergence if d.divergence is not None and d.divergence in d.steps else (d.steps or [0])[0]
        self.step = w.Dropdown(options=d.steps or [0], value=default, description="step")
        self.layer = w.Dropdown(options=d.layers, value=d.layers[0], description="layer")
        self.buttons = [w.Button(description=f"rewind {which} here") for which in ("a", "b")]
        for which, button in zip(("a", "b"), self.buttons):
            button.on_click(lambda _b, which=which: self.rewind(which))
        self.status = w.HTML("")
        self.box = w.VBox([w.HTML(diff_html(d)), w.Image(value=to_png(plot_diff(d, relative)), format="png"),
                           w.HBox([self.step, self.layer, *self.buttons]), self.status])

    def rewind(self, which: str) -> Run | None:
        """Rewind branch ``which`` to the chosen step, paused at the chosen layer (the diff's site)."""
        try:
            run = self.diff.rewind(which, int(self.step.value), int(self.layer.value), self.diff.site)
        except Exception as e:  # noqa: BLE001 - shown in the view, not raised into the widget's callback
            self.status.value = f'<span style="color:#b00">{html.escape(str(e))}</span>'
            return None
        self.rewound = run
        self.status.value = html.escape(f"run {run.id}: branch {which} rewound, paused at layer {run.layer} "
                                        f"{run.site}, step {run.step}")
        if self.on_rewind is not None:
            self.on_rewind(run)
        return run

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = self.box._repr_mimebundle_(**kwargs) or {}
        bundle["text/plain"] = repr(self)
        bundle.setdefault("text/html", diff_html(self.diff))
        return bundle

    def __repr__(self) -> str:
        return f"<djinn DiffView {self.diff!r}>"


@magics_class
class BranchMagics(Magics):
    """``%djinn_diff``; shares the client and the current run with ``DjinnMagics``."""

    def __init__(self, shell: Any, main: Any):
        super().__init__(shell)
        self.main = main

    def _run(self, word: str) -> Run:
        value = self.shell.user_ns.get(word) if self.shell is not None else None
        if isinstance(value, Run):
            return value
        return usage_errors(self.main._target)(word)

    @line_magic
    def djinn_diff(self, line: str = "") -> DiffView:
        """Compare two runs of one prompt: the texts aligned, a layer × step heatmap of the distance
        between their states, the KL per step; rewind either branch to a chosen step.

        %djinn_diff a b [layers=0,4,8] [site=resid_post] [k=5] [relative=true]

        ``a`` and ``b`` are variables holding runs, or run ids. A rewind made from the view
        becomes the current run.
        """
        spec = {"layers": A.int_list, "site": A.text, "k": A.integer, "relative": A.flag}
        p = usage_errors(A.parse)(line, spec, "djinn_diff", anywhere=True)
        words = p.rest.split()
        if len(words) != 2:
            raise UsageError("%djinn_diff compares two runs: %djinn_diff a b (variables holding runs, or run ids)")
        a, b = self._run(words[0]), self._run(words[1])
        o = p.options
        d = usage_errors(diff)(a, b, layers=o.get("layers"), site=o.get("site", "resid_post"), k=o.get("k", 5))

        def current(run: Run) -> None:
            self.main.run = run

        return DiffView(d, relative=o.get("relative", False), on_rewind=current)
