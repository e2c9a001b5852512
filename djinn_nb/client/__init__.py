"""The client: the public Python API (``connect``, ``Client``, ``Run``) over the serving layer.

``connection`` holds ``connect`` and ``Client`` (one rpyc connection, embedded servers);
``run`` holds ``Run``, a handle on a run whose state lives on the server; ``branches`` holds
``diff`` (two runs of one prompt compared on the server).
"""
from .connection import Client, connect
from .run import Run
from .branches import Diff, diff

__all__ = ["connect", "Client", "Run", "Diff", "diff"]
