"""djinn_nb: pause a language model's forward pass at a layer, inspect, steer, resume.

The model, its weights and its KV cache stay on a server (``djinn-server``, or
one embedded in this process); this package's client talks to it over rpyc.

    import djinn_nb
    client = djinn_nb.connect()                      # embedded default model
    run = client.generate("The capital of France is", breakpoints=[6])
    h = run.activation()                             # (1, positions, hidden)
    run.resume(scale=0.9).text

Layers, lowest first (a test keeps each from importing a higher one):
``core`` (model and runs; no rpyc) → ``serving`` (rpyc server; no IPython) →
``client`` (this API) → ``notebook`` (magics, display, widgets; the client API, and the
wire's typed replies it renders); ``wire`` (the typed messages, codec, protocol, transport,
side channel, TLS) is shared by serving and client; core knows nothing of it.
``errors``, ``states``, ``conditions`` and ``version`` are shared vocabulary every layer may use.
"""
from typing import TYPE_CHECKING, Any

from .core.threads import prefer_passive_waiting

prefer_passive_waiting()  # before anything imports torch: see core/threads.py

from .errors import DjinnError  # noqa: E402
from .version import __version__  # noqa: E402

if TYPE_CHECKING:
    from .client import Client, Run, connect, diff

__all__ = ["connect", "Client", "Run", "DjinnError", "__version__", "load_ipython_extension", "causal_trace",
           "plot_causal_trace", "diff", "attribution_patching", "top_k_of", "rank_agreement", "plot_trace_panels",
           "plot_grids_side_by_side"]
_PATCHING = ("attribution_patching", "top_k_of", "rank_agreement", "plot_trace_panels", "plot_grids_side_by_side")


def __getattr__(name: str) -> Any:
    """The client API, imported on first use: ``djinn_nb.core`` alone (an in-process engine
    on a machine without rpyc, say) then needs neither rpyc nor the client. ``causal_trace``,
    ``attribution_patching`` and their plots live in the notebook layer (pandas, matplotlib)."""
    if name in ("connect", "Client", "Run", "diff"):
        from .core.gcpause import paused_gc

        with paused_gc():  # the client imports torch: a second of imports, see core/gcpause.py
            from .client import Client, Run, connect, diff

        return {"connect": connect, "Client": Client, "Run": Run, "diff": diff}[name]
    if name in ("causal_trace", "plot_causal_trace"):
        from .notebook import tracing

        return getattr(tracing, name)
    if name in _PATCHING:
        from .notebook import patching

        return getattr(patching, name)
    raise AttributeError(f"module 'djinn_nb' has no attribute {name!r}")


def load_ipython_extension(ipython):  # pragma: no cover - exercised through IPython
    from .notebook.magics import register

    register(ipython)


def _show_as_html() -> None:
    """In a running IPython kernel, show ``Run`` and ``Client`` as HTML cards (notebook layer)."""
    import sys

    ipython_mod = sys.modules.get("IPython")
    ipython = ipython_mod.get_ipython() if ipython_mod is not None else None
    if ipython is not None:
        from .notebook.formatters import register

        register(ipython)


_show_as_html()
