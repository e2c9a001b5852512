"""The steering slider: drag a factor, see the continuation from the checkpoint change;
and the attention head selector.

Each slider change asks a worker thread for a fork of the paused run with the
activation scaled by the new value. The worker runs only the latest requested
value: moves made while a fork is running replace each other, so calls never
pile up. Every fork is closed as soon as its tokens are read, so the server
holds nothing but the paused run. ``wait()`` blocks until the latest request is
shown, which is how tests and headless notebooks use it.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .display import Attention, Comparison, decode_text, token_strings
from ..errors import DjinnError

if TYPE_CHECKING:  # pragma: no cover
    from ..client import Client, Run

__all__ = ["ForkResult", "SteeringWidget", "AttentionWidget"]


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
    ):
        import ipywidgets as w

        if not run.paused:
            raise ValueError(f"run {run.id} is {run.state}: steering needs a paused run")
        self.client, self.run, self.heads = client, run, heads
        with run.fork(breakpoints=[]) as base:
            self.baseline_ids = base.token_ids
        self.baseline_tokens = token_strings(client, self.baseline_ids)
        self.slider = w.FloatSlider(
            value=value, min=min, max=max, step=step, continuous_update=False,
            description="scale", readout_format=".2f",
        )
        self.output = w.HTML(value=self._comparison(self.baseline_ids, "unmodified", "")._repr_html_())
        what = f", heads {', '.join(map(str, heads))}" if heads else ""
        self.status = w.Label(value=f"run {run.id}, layer {run.layer} {run.site}{what}, step {run.step}: "
                                    "move the slider to fork")
        self.box = w.VBox([self.slider, self.output, self.status])
        self.results: list[ForkResult] = []  # every fork computed, oldest first (bounded)
        self.latest: ForkResult | None = None
        self.error: str | None = None
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
        with self._cond:
            self._wanted = float(value)
            self._cond.notify_all()

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
            result, error = None, None
            try:
                result = self._fork(value)
            except DjinnError as e:
                error = f"fork at scale {value:.3g} failed: {e}"
            except Exception as e:  # noqa: BLE001 - a worker must not die silently
                error = f"fork at scale {value:.3g} failed: {type(e).__name__}: {e}"
            with self._cond:
                self._show(result, error)
                self._busy = False
                self._cond.notify_all()

    def _fork(self, value: float) -> ForkResult:
        t0 = time.perf_counter()
        fork = self.run.fork(scale=value, breakpoints=[], heads=self.heads)
        latency = (time.perf_counter() - t0) * 1e3
        with fork:
            ids = fork.token_ids
        note = f"fork latency {latency:.1f} ms"
        comparison = self._comparison(ids, f"scale {value:.3g}", note)
        return ForkResult(value, ids, decode_text(self.client, ids), latency, comparison)

    def _comparison(self, ids: list[int], label: str, note: str) -> Comparison:
        tokens = self.baseline_tokens if ids == self.baseline_ids else token_strings(self.client, ids)
        return Comparison(self.baseline_ids, self.baseline_tokens, ids, tokens, label, note)

    def _show(self, result: ForkResult | None, error: str | None) -> None:
        self.error = error
        if result is None:
            self.status.value = error or ""
            return
        self.latest = result
        self.results.append(result)
        del self.results[: -self._max_results]
        self.output.value = result.comparison._repr_html_()
        self.status.value = (
            f"scale {result.scale:.3g}: {result.comparison.changed} tokens changed, "
            f"fork {result.latency_ms:.1f} ms"
        )

    # ----- display and cleanup ----------------------------------------------------
    def close(self) -> None:
        """Stop the worker and close the widgets; the paused run stays as it is."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=60)
        self.box.close()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.box._repr_mimebundle_(**kwargs)

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
