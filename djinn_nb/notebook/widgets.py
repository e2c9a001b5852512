"""The steering slider: drag a factor, see the continuation from the checkpoint change;
and the attention head selector.

Each slider change asks a worker thread for a fork of the paused run with the
activation scaled by the new value. The worker runs only the latest requested
value: moves made while a fork is running replace each other, so calls never
pile up. While a fork runs, the text shown is dimmed under a "computing" line,
so an old text never sits under a new value as if it were its result. Every
fork is made with ``close=True``: closed on the server in the same call, its
tokens, text and history (each token's top-k, the hover alternatives, with their
texts) in the reply, so a move is one round trip and the server holds nothing
but the paused run. Once that run is no longer paused (resumed, closed), the slider
disables itself and says why. ``wait()`` blocks until the latest request is
shown, which is how tests and headless notebooks use it.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .compare import Comparison
from .display import Attention, decode_text, token_strings
from ..errors import DjinnError

if TYPE_CHECKING:  # pragma: no cover
    from ..client import Client, Run

__all__ = ["ForkResult", "SteeringWidget", "AttentionWidget", "forks_at", "effect_svg"]


def forks_at(run: "Run", scales: list[float], **kw: Any) -> list["Run"]:
    """One fork of ``run`` per scale (with ``kw``: ``breakpoints``, ``heads``), in order: one
    batched ``run.fork_many`` call where the client has it, else one ``run.fork`` per scale."""
    kw = {k: v for k, v in kw.items() if v is not None}
    fork_many = getattr(run, "fork_many", None)
    if fork_many is not None:
        return list(fork_many([{"scale": float(s), **kw} for s in scales]))
    return [run.fork(scale=float(s), **kw) for s in scales]


def effect_svg(points: dict[float, float], current: float | None, lo: float, hi: float,
               width: int = 260, height: int = 90) -> str:
    """A small inline SVG (no JavaScript, nothing to install): the fraction of tokens changed
    against the factor, for every factor computed so far; the one shown is the larger red dot."""
    pad, span = 22, (hi - lo) or 1.0

    def xy(x: float, y: float) -> tuple[float, float]:
        return pad + (x - lo) / span * (width - pad - 6), height - pad - y * (height - pad - 8)

    dots, line = [], []
    for x in sorted(points):
        px, py = xy(x, points[x])
        line.append(f"{px:.1f},{py:.1f}")
        big = current is not None and abs(x - current) < 1e-12
        dots.append(f"<circle cx='{px:.1f}' cy='{py:.1f}' r='{4 if big else 2.5}' fill='{'#c44e52' if big else '#4c72b0'}'>"
                    f"<title>scale {x:.3g}: {points[x]:.0%} changed</title></circle>")
    x0, y0 = xy(lo, 0)
    x1, y1 = xy(hi, 1)
    return (
        f"<svg class='djinn-effect' width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg' "
        f"style='font:10px monospace'>"
        f"<line x1='{x0}' y1='{y0}' x2='{x1}' y2='{y0}' stroke='#888'/><line x1='{x0}' y1='{y0}' x2='{x0}' y2='{y1}' stroke='#888'/>"
        f"<text x='{x0}' y='{height - 6}'>{lo:g}</text><text x='{x1 - 14}' y='{height - 6}'>{hi:g}</text>"
        f"<text x='{x0 + 40}' y='{height - 6}'>factor</text><text x='2' y='{y1 + 4}'>1</text><text x='2' y='{y0}'>0</text>"
        f"<text x='{x0 + 4}' y='{y1 - 1}'>tokens changed</text>"
        f"<polyline points='{' '.join(line)}' fill='none' stroke='#4c72b0' stroke-opacity='0.5'/>{''.join(dots)}</svg>"
    )


@dataclass
class ForkResult:
    """One fork's continuation at ``scale`` and the client's wall time for it."""

    scale: float
    token_ids: list[int]
    text: str
    latency_ms: float
    comparison: Comparison


class SteeringWidget:
    """A ``FloatSlider`` over the scale of a paused run's activation, with the fork's text beside the baseline.

    ``client`` is the run's client (used to decode tokens); the run must be
    paused and stays paused. ``set(v)`` moves the slider and waits for the fork.
    """

    def __init__(
        self,
        client: "Client",
        run: "Run",
        min: float = 0.0,
        max: float = 2.0,
        step: float = 0.05,
        value: float = 1.0,
        max_results: int = 100,
        heads: list[int] | None = None,
        top_k: int = 5,
    ):
        import ipywidgets as w

        if not run.paused:
            raise ValueError(f"run {run.id} is {run.state}: steering needs a paused run")
        self.client, self.run, self.heads = client, run, heads
        self.lo, self.hi = float(min), float(max)
        self.top_k = top_k  # hover alternatives per token, from the server's top-k (0: none)
        base = run.fork(breakpoints=[], close=True)
        self.baseline_ids = base.token_ids
        self.baseline_tokens = token_strings(client, self.baseline_ids)
        self.prompt = decode_text(client, run.prompt_ids)
        self.slider = w.FloatSlider(
            value=value, min=min, max=max, step=step, continuous_update=False,
            description="scale", readout_format=".2f",
        )
        what = f", heads {', '.join(map(str, heads))}" if heads else ""
        self.where = f"run {run.id}, layer {run.layer} {run.site}{what}, step {run.step}"
        self.effect: dict[float, float] = {}  # factor -> fraction of tokens changed, every fork so far
        self.latest: ForkResult | None = None
        self._shown_html = self._comparison(self.baseline_ids, "unmodified", "")._repr_html_()
        self.output = w.HTML(value=self._page(self._shown_html))
        self.status = w.HTML(value=self._status(f"{self.where}: move the slider to fork"))
        self.box = w.VBox([self.slider, self.output, self.status])
        self.results: list[ForkResult] = []  # every fork computed, oldest first (bounded)
        self.error: str | None = None
        self.disabled_reason: str | None = None
        self._max_results = max_results
        self._cond = threading.Condition()
        self._wanted: float | None = None
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"djinn-steer-{run.id}", daemon=True)
        self._thread.start()
        self.slider.observe(self._on_change, names="value")

    # ----- requests ---------------------------------------------------------------
    def _on_change(self, change: dict[str, Any]) -> None:
        self.request(change["new"])

    def request(self, value: float) -> None:
        """Ask for a fork at ``value``; replaces any request not yet started."""
        if self.check():
            return
        with self._cond:
            self._wanted = float(value)
            self._cond.notify_all()
            self._busy_view(float(value))

    def check(self) -> str | None:
        """Disable the slider, with the reason shown, if its run is no longer paused; returns
        the reason (``None``: still live). Uses the client's last word on the run, no server call."""
        if self.disabled_reason is None and not self.run.paused:
            self._disable(f"run {self.run.id} is {self.run.state}, no longer paused, so there is no "
                          "checkpoint to fork: pause a run again and start a new slider (%djinn_steer)")
        return self.disabled_reason

    def _disable(self, reason: str) -> None:
        if self.disabled_reason is not None:
            return
        self.disabled_reason = reason
        self.slider.disabled = True
        self.output.value = self._page(self._shown_html, dim=True)
        self.status.value = self._status(f"slider disabled: {reason}", "#a00")
    def wait(self, timeout: float = 120.0) -> ForkResult | None:
        """Block until no request is pending or running; returns the latest result."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._wanted is None and not self._busy, timeout):
                raise TimeoutError(f"the steering fork did not finish within {timeout} s")
            return self.latest

    def set(self, value: float, timeout: float = 120.0) -> ForkResult | None:
        """Move the slider to ``value`` (as a person would) and wait for its fork."""
        if self.slider.value == value:
            self.request(value)
        self.slider.value = value
        return self.wait(timeout)

    # ----- the worker -------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._wanted is not None or self._closed)
                if self._closed:
                    return
                value, self._wanted, self._busy = self._wanted, None, True
            assert value is not None, "woken with a value wanted, or closed"
            result, error = None, None
            try:
                result = self._fork(value)
            except DjinnError as e:
                error = f"fork at scale {value:.3g} failed: {e}"
                try:
                    self.run.refresh()  # resumed elsewhere? then check() disables the slider
                except DjinnError as gone:
                    self._disable(f"run {self.run.id} is gone from the server ({gone}): start a new slider")
            except Exception as e:  # noqa: BLE001 - a worker must not die silently
                error = f"fork at scale {value:.3g} failed: {type(e).__name__}: {e}"
            with self._cond:
                self._show(result, error)
                self._busy = False
                self._cond.notify_all()

    def _fork(self, value: float) -> ForkResult:
        t0 = time.perf_counter()
        fork, = forks_at(self.run, [value], breakpoints=[], heads=self.heads, close=True)
        latency = (time.perf_counter() - t0) * 1e3
        with fork:
            ids = fork.token_ids
            alternatives = self._alternatives(fork, len(ids))
        note = f"fork latency {latency:.1f} ms"
        comparison = self._comparison(ids, f"scale {value:.3g}", note)
        comparison.alternatives = alternatives
        return ForkResult(value, ids, decode_text(self.client, ids), latency, comparison)

    def _alternatives(self, fork: "Run", n: int) -> list[list[tuple[str, float]]] | None:
        """Per generated token, the top-k tokens (text, probability) of the step that chose it, as
        the server recorded them (``run.history()``: at most its 5); ``None`` without token texts."""
        if not self.top_k:
            return None
        records = fork.history()
        if len(records) != n:
            return None
        ids = [i for r in records for i, _ in r["topk"][: self.top_k]]
        texts = dict(zip(ids, token_strings(self.client, ids)))  # known already (or '#id', no tokenizer)
        return [[(texts[i], p) for i, p in r["topk"][: self.top_k]] for r in records]

    def _comparison(self, ids: list[int], label: str, note: str) -> Comparison:
        tokens = self.baseline_tokens if ids == self.baseline_ids else token_strings(self.client, ids)
        return Comparison(self.baseline_ids, self.baseline_tokens, ids, tokens, label, note, self.prompt)

    # ----- views ------------------------------------------------------------------
    @staticmethod
    def _status(text: str, color: str = "#333") -> str:
        import html

        return f"<div class='djinn-status' style='font-size:12px;color:{color};text-align:left'>{html.escape(text)}</div>"

    def _page(self, comparison_html: str, dim: bool = False, busy: str = "") -> str:
        current = self.latest.scale if self.latest else None
        plot = effect_svg(self.effect, current, self.lo, self.hi) if self.effect else ""
        style = "opacity:0.4" if dim else ""
        banner = f"<div class='djinn-busy' style='font-size:12px;color:#a60'>{busy}</div>" if busy else ""
        return (f"<div style='display:flex;gap:12px;align-items:flex-start;text-align:left'>"
                f"<div class='djinn-shown' style='flex:1;{style}'>{banner}{comparison_html}</div>{plot}</div>")

    def _busy_view(self, value: float) -> None:
        shown = f"scale {self.latest.scale:.3g}" if self.latest else "the unmodified text"
        busy = f"computing scale {value:.3g}&hellip; (dimmed: {shown})"
        self.output.value = self._page(self._shown_html, dim=True, busy=busy)
        self.status.value = self._status(f"{self.where}: computing scale {value:.3g}…", "#a60")

    def _show(self, result: ForkResult | None, error: str | None) -> None:
        self.error = error
        if result is None:
            if self.check() is None:
                self.output.value = self._page(self._shown_html)
                self.status.value = self._status(error or "", "#a00")
            return
        self.latest = result
        self.results.append(result)
        del self.results[: -self._max_results]
        c = result.comparison
        self.effect[result.scale] = c.changed / max(c.total, 1)
        self._shown_html = c._repr_html_()
        if self._wanted is None:  # else a newer value is waiting: stay dimmed under its banner
            self.output.value = self._page(self._shown_html)
            self.status.value = self._status(f"{self.where}: showing scale {result.scale:.3g}")
        else:
            self._busy_view(self._wanted)

    # ----- display and cleanup ----------------------------------------------------
    def close(self) -> None:
        """Stop the worker and close the widgets; the paused run stays as it is."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=60)
        self.box.close()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = self.box._repr_mimebundle_(**kwargs) or {}
        bundle["text/plain"] = repr(self)  # a terminal shows this, not the VBox's repr
        return bundle

    def __repr__(self) -> str:
        v = f", showing scale {self.latest.scale:.3g}" if self.latest else ""
        return f"<djinn SteeringWidget on run {self.run.id} (layer {self.run.layer}, step {self.run.step}){v}>"


class AttentionWidget:
    """A head selector (``Dropdown``: all heads or one) above the attention heatmaps of an
    :class:`~djinn_nb.notebook.display.Attention`; the figure is an ordinary PNG output that
    each choice replaces (so a saved or headless notebook keeps the last one shown)."""

    def __init__(self, attention: Attention, head: int | None = None):
        import ipywidgets as w

        self.attention = attention
        options = [("all heads", -1)] + [(f"head {h}", h) for h in range(attention.num_heads)]
        self.selector = w.Dropdown(options=options, value=-1 if head is None else head, description="head")
        self.selector.observe(self._on_change, names="value")
        self._handle: Any = None

    @property
    def head(self) -> int | None:
        return None if self.selector.value == -1 else int(self.selector.value)

    def _image(self) -> Any:
        from IPython.display import Image

        from .plots import to_png

        return Image(data=to_png(self.attention.plot(self.head)))

    def show(self) -> "AttentionWidget":
        """Display the selector and the figure of the selected head(s)."""
        from IPython.display import display

        display(self.selector)
        self._handle = display(self._image(), display_id=True)
        return self

    def _on_change(self, change: dict[str, Any]) -> None:
        if self._handle is not None:
            self._handle.update(self._image())

    def close(self) -> None:
        self.selector.close()

    def __repr__(self) -> str:
        return f"<djinn AttentionWidget {self.attention!r}, showing {'all heads' if self.head is None else self.head}>"
