"""Rich HTML for ``Client`` and ``Run`` objects in Jupyter, registered with IPython's formatters.

The client layer knows nothing of HTML; this module tells IPython how to show
its objects, through the client's public API and :mod:`display`.
"""
from __future__ import annotations

from typing import Any

from ..client import Client, Run
from ..errors import DjinnError
from .display import client_html, run_html


def run_card(run: Run) -> str:
    return run_html(run.details, run.client)


def client_card(client: Client) -> str:
    try:
        runs = client.runs()
    except DjinnError:
        runs = None
    return client_html(client.info, client.address, runs)


def register(ipython: Any) -> None:
    """Show runs and clients as HTML cards in ``ipython`` (a no-op without a display formatter)."""
    formatters = getattr(getattr(ipython, "display_formatter", None), "formatters", None)
    if not formatters or "text/html" not in formatters:
        return
    html = formatters["text/html"]
    html.for_type(Run, run_card)
    html.for_type(Client, client_card)
