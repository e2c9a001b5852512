"""The client: the public Python API (``connect``, ``Client``, ``Run``) over the serving layer.

``connection`` holds ``connect`` and ``Client`` (one rpyc connection, embedded servers); ``local``
finds or starts the per-user local server; ``run`` holds ``Run``, a handle on a run whose state
lives on the server; ``branches`` holds ``diff`` (two runs of one prompt compared on the server);
``features`` the sparse-autoencoder calls (``Sae``; ``Saes``, the collaborator behind ``client.load_sae``
and ``run.features``); ``edits`` the edit and fork requests a run builds.
"""
from .connection import Client, connect
from .features import Sae
from .run import Run
from .branches import Diff, diff

__all__ = ["connect", "Client", "Run", "Diff", "diff", "Sae"]
