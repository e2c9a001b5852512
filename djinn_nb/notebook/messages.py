"""The one-line messages the magics print or raise, kept apart from the magics' control flow.

A line after ``r = %djinn_run`` says where the run stopped (an assignment shows
nothing else); a hint on a run that is not paused says what to do next given the
breakpoints already set, rather than suggesting one that exists.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ..errors import DjinnError

if TYPE_CHECKING:  # pragma: no cover
    from ..client import Run

__all__ = ["run_line", "not_paused_hint", "breakpoints_text", "loading_line", "BREAK_HINT"]

BREAK_HINT = "set a breakpoint with %djinn_break layer=6, then start a run with %djinn_run <prompt>"


def breakpoints_text(breakpoints: Sequence[dict[str, Any]]) -> str:
    return ", ".join(f"layer {b['layer']} step {b['step']} {b.get('site', 'resid_post')}" for b in breakpoints)


def run_line(run: "Run") -> str:
    """Where a run stands, and what the next magics are: printed by ``%djinn_run``/``%djinn_resume``."""
    if run.paused:
        when = "the prompt pass" if run.step == 0 else f"decoding step {run.step}"
        return (f"run {run.id} paused at layer {run.layer} ({run.site}), {when}; {len(run.token_ids)} tokens so far. "
                "Next: %djinn_inspect, %djinn_steer, %djinn_resume")
    if not run.done:
        return f"run {run.id} {run.state}"
    try:
        text = f", {run.text!r}"
    except DjinnError:  # a model without a tokenizer
        text = ""
    return f"run {run.id} done: {len(run.token_ids)} tokens{text}"


def not_paused_hint(run: "Run", breakpoints: Sequence[dict[str, Any]]) -> str:
    """Why ``run`` cannot be inspected/resumed/steered, and what to do given the breakpoints set now."""
    if breakpoints:
        nxt = f"start a new run with %djinn_run <prompt>; it pauses at the breakpoints set ({breakpoints_text(breakpoints)})"
    else:
        nxt = BREAK_HINT
    return f"run {run.id} is {run.state}, not paused: {nxt}"


def loading_line(model: str | None, device: str | None) -> str:
    """Printed before a connect with no address: the first one starts the local server and loads the model."""
    name = model or "the default model SmolLM2-135M-Instruct"
    return (f"connecting to the local server of {name} on {device or 'cpu'}: the first connect starts it in the "
            "background and loads the model (the first time, the default model is converted from its GGUF file and "
            "cached: measured 34-51 s on a 2-core CPU; about 10 s once cached); later connects, from any kernel, "
            "take a fraction of a second (`djinn-server status`, `djinn-server stop`)")
