"""The debugger's stepping magics: ``%djinn_next_layer``, ``%djinn_next_step``, ``%djinn_rewind``,
``%djinn_history``.

They act on the current run of :class:`~djinn_nb.notebook.magics.DjinnMagics` (or ``run=ID``)
through the client API only, and make the run they leave paused the current one, so that
``%djinn_inspect`` and ``%djinn_resume`` follow. Kept apart from ``magics.py`` so each
module has one job; ``register`` in ``magics.py`` loads both.
"""
from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from . import magic_args as A
from ..client import Run
from .history import TokenHistory
from .usage import usage_errors

__all__ = ["NavigationMagics", "where"]


def where(run: Run) -> str:
    """One line saying where a run stands."""
    if run.paused:
        return f"run {run.id} paused at layer {run.layer} {run.site}, step {run.step} ({len(run.token_ids)} tokens so far)"
    return f"run {run.id} is {run.state} after {len(run.token_ids)} tokens"


@magics_class
class NavigationMagics(Magics):
    """Stepping and rewinding; shares the client and the current run with ``DjinnMagics``."""

    def __init__(self, shell: Any, main: Any):
        super().__init__(shell)
        self.main = main  # the DjinnMagics instance: its client and current run

    def _call(self, line: str, name: str, spec: dict[str, Any]) -> tuple[Run, dict[str, Any]]:
        p = usage_errors(A.parse)(line, {**spec, "run": A.text}, name, anywhere=True)
        if p.rest:
            raise UsageError(f"%{name} takes key=value words ({', '.join(f'{k}=' for k in spec) or 'run='}), not {p.rest!r}")
        return usage_errors(self.main._target)(p.options.get("run")), p.options

    def _step(self, line: str, name: str) -> Run:
        run, _ = self._call(line, name, {})
        if not run.paused:
            raise UsageError(f"run {run.id} is {run.state}, not paused: %djinn_rewind step=N goes back into it")
        usage_errors(getattr(run, name.removeprefix("djinn_")))()
        self.main.run = run
        print(where(run))
        return run

    @line_magic
    def djinn_next_layer(self, line: str = "") -> Run:
        """Pause at the next block's output in the same step, whatever the breakpoints (they apply
        afterwards); returns the run.

        %djinn_next_layer [run=r3]
        """
        return self._step(line, "djinn_next_layer")

    @line_magic
    def djinn_next_step(self, line: str = "") -> Run:
        """Pause at the same layer and site one step later (or run to the end if there is none).

        %djinn_next_step [run=r3]
        """
        return self._step(line, "djinn_next_step")

    @line_magic
    def djinn_rewind(self, line: str = "") -> Run:
        """A new run paused at an earlier step of this one (paused or finished); it becomes the current run.

        %djinn_rewind step=4 [layer=6] [site=mlp_out] [run=r3]

        Defaults: where the run is (or was last) paused. The steps are those %djinn_history shows.
        """
        run, opts = self._call(line, "djinn_rewind", dict(step=A.integer, layer=A.integer, site=A.text))
        if "step" not in opts:
            raise UsageError("%djinn_rewind needs step=N (see %djinn_history for the steps)")
        new = usage_errors(run.rewind)(opts["step"], opts.get("layer"), opts.get("site"))
        self.main.run = new
        print(where(new) + f", rewound from run {run.id}")
        return new

    @line_magic
    def djinn_history(self, line: str = "") -> TokenHistory:
        """The generated tokens, shaded by entropy, with each step's top-k on hover.

        %djinn_history [run=r3]
        """
        run, _ = self._call(line, "djinn_history", {})
        client = self.main._client()
        prompt = None
        if client.info.get("has_tokenizer"):
            prompt = usage_errors(client.decode)(run.prompt_ids)
        return TokenHistory(usage_errors(run.history)(), prompt)
