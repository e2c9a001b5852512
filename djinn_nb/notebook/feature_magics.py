"""The sparse-autoencoder magics: ``%djinn_features`` (a table of each position's most active
features) and ``%djinn_steer feature=N`` (a slider over one feature's value).

Kept apart from ``magics.py`` so each module has one job; ``register`` in ``magics.py`` loads
it after the others, so its ``%djinn_steer`` takes the line first: with ``feature=`` it is a
feature slider (forks with ``clamp={N: value}``), without it the scale slider of ``magics.py``.
Through the client API only; the SAE is one loaded with ``client.load_sae``.
"""
from __future__ import annotations

import html
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from . import magic_args as A
from ..client import Run, Sae
from ..client.features import FeatureRows, read_labels
from .display import decode_text
from .usage import usage_errors
from .widgets import ForkResult, SteeringWidget

__all__ = ["FeatureMagics", "FeatureTable", "FeatureSteeringWidget"]


class FeatureTable:
    """``run.features()`` as a table: per position its token and its features ``id (activation)``,
    with their labels where a label file was given."""

    def __init__(self, rows: FeatureRows, labels: dict[int, str] | None = None, where: str = ""):
        self.rows, self.labels, self.where = rows, labels or {}, where

    def _cell(self, feature: int, act: float) -> str:
        label = self.labels.get(feature)
        return f"{feature} ({act:.3g})" + (f" {label}" if label else "")

    def _token(self, i: int) -> str:
        tokens = self.rows.tokens
        if tokens and i < len(tokens):
            return repr(tokens[i])
        ids = self.rows.token_ids
        return f"#{ids[i]}" if i < len(ids) else ""

    def __repr__(self) -> str:
        lines = [f"SAE {self.rows.sae} features, {self.where}"]
        lines += [f"{i:>4} {self._token(i):<14} " + ", ".join(self._cell(f, a) for f, a in row)
                  for i, row in enumerate(self.rows)]
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{j + 1}</th>" for j in range(max((len(r) for r in self.rows), default=0)))
        body = "".join(
            f"<tr><td>{i}</td><td><code>{html.escape(self._token(i))}</code></td>"
            + "".join(f"<td>{html.escape(self._cell(f, a))}</td>" for f, a in row) + "</tr>"
            for i, row in enumerate(self.rows))
        return (f"<div><b>SAE {html.escape(self.rows.sae)}</b> features, {html.escape(self.where)}"
                f"<table><tr><th>pos</th><th>token</th>{head}</tr>{body}</table></div>")


class FeatureSteeringWidget(SteeringWidget):
    """The steering slider over one SAE feature's value: each move forks with ``clamp={feature: value}``."""

    def __init__(self, client: Any, run: Run, sae: Sae | str, feature: int, **kw: Any):
        self.sae, self.feature = sae, feature
        super().__init__(client, run, **kw)
        self.slider.description = f"f{feature}"
        self.where = f"{self.where}, SAE {getattr(sae, 'id', sae)} feature {feature}"

    def _fork(self, value: float) -> ForkResult:
        t0 = time.perf_counter()
        fork, = self.run.fork_many([{"clamp": {self.feature: float(value)}, "sae": self.sae, "breakpoints": [],
                                     "close": True}])
        latency = (time.perf_counter() - t0) * 1e3
        with fork:
            ids = fork.token_ids
            alternatives = self._alternatives(fork, len(ids))
        comparison = self._comparison(ids, f"feature {self.feature} = {value:.3g}", f"fork latency {latency:.1f} ms")
        comparison.alternatives = alternatives
        return ForkResult(value, ids, decode_text(self.client, ids), latency, comparison)


@magics_class
class FeatureMagics(Magics):
    """``%djinn_features`` and the feature form of ``%djinn_steer``; shares the client and run with ``DjinnMagics``."""

    def __init__(self, shell: Any, main: Any):
        super().__init__(shell)
        self.main = main

    def _sae(self, run: Run, name: str | None) -> Sae | str:
        """``sae=`` as a notebook variable holding a ``Sae``, or an id; by default the one SAE
        loaded at the run's layer and site."""
        ns = self.shell.user_ns if self.shell is not None else {}
        if name is not None:
            value = ns.get(name)
            return value if isinstance(value, Sae) else name
        here = [s for s in self.main._client().saes() if (s.layer, s.site) == (run.layer, run.site)]
        if len(here) != 1:
            some = "several SAEs read" if here else "no SAE reads"
            raise UsageError(f"{some} layer {run.layer} {run.site}, where run {run.id} is paused: name one with sae=ID "
                             "(client.load_sae(path, site=...) loads one)")
        mine = [v for v in ns.values() if isinstance(v, Sae) and v.id == here[0].id]
        return mine[0] if mine else here[0]  # the notebook's handle has the labels

    @line_magic
    @usage_errors
    def djinn_features(self, line: str = "") -> FeatureTable:
        """The most active SAE features at each position of the paused activation.

        %djinn_features [k=10] [sae=ID] [ids=3,17] [labels=FILE.json] [run=r3]

        sae= names a loaded SAE (a notebook variable from client.load_sae, or its id); by
        default the one loaded at the run's layer and site. ids= reads those features instead
        of the top k. labels= a JSON file of feature labels (else the SAE handle's own).
        """
        p = A.parse(line, dict(k=A.integer, sae=A.text, ids=A.int_list, labels=A.text, run=A.text), "djinn_features",
                    anywhere=True)
        if p.rest:
            raise UsageError(f"%djinn_features takes key=value words (k=, sae=, ids=, labels=, run=), not {p.rest!r}")
        o = p.options
        run = self.main._paused(o.get("run"))
        sae = self._sae(run, o.get("sae"))
        rows = run.features(sae, k=o.get("k", 10), ids=o.get("ids"))
        labels = read_labels(o["labels"]) if "labels" in o else getattr(sae, "labels", {})
        return FeatureTable(rows, labels, f"run {run.id}, layer {run.layer} {run.site}, step {run.step}")

    @line_magic
    @usage_errors
    def djinn_steer(self, line: str = "") -> Any:
        """A slider: over the steering factor, or with feature=N over one SAE feature's value.

        %djinn_steer feature=N [sae=ID] [min=0] [max=10] [step=0.1] [value=0] [run=r3]
        %djinn_steer [layer=N] [min=0] [max=2] [step=0.05] [value=1] [heads=1,3] [run=r3] [prompt]

        With feature=, each move forks the paused run with clamp={N: value} on the SAE (sae=, or
        the one loaded where the run is paused): the feature set to the value, the SAE's error
        term kept. Without it, the activation-scaling slider (see the second form).
        """
        if "feature=" not in line:
            return self.main.djinn_steer(line)
        spec = dict(feature=A.integer, sae=A.text, min=A.number, max=A.number, step=A.number, value=A.number,
                    run=A.text)
        p = A.parse(line, spec, "djinn_steer", anywhere=True)
        if p.rest:
            raise UsageError(f"%djinn_steer feature=N takes key=value words only, not {p.rest!r}")
        o = p.options
        lo, hi = o.get("min", 0.0), o.get("max", 10.0)
        step, value = o.get("step", (hi - lo) / 100 if hi > lo else 0.1), o.get("value", lo)
        if not lo < hi or not 0 < step <= hi - lo or not lo <= value <= hi:
            raise UsageError(f"need min < max, 0 < step <= max-min and min <= value <= max (got min={lo} max={hi} "
                             f"step={step} value={value})")
        run = self.main._paused(o.get("run"))
        sae = self._sae(run, o.get("sae"))
        run.features(sae, ids=[o["feature"]])  # the SAE reads here and has the feature: said now, not per move
        widget = FeatureSteeringWidget(self.main._client(), run, sae, o["feature"], min=lo, max=hi, step=step,
                                       value=value)
        self.main.widgets.append(widget)
        return widget
