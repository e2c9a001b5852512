"""The client: the public Python API (``connect``, ``Client``, ``Run``) over the serving layer.

``connection`` holds ``connect`` and ``Client`` (one rpyc connection, embedded servers); ``local``
finds or starts the per-user local server;
``run`` holds ``Run``, a handle on a run whose state lives on the server.
"""
from .connection import Client, connect
from .run import Run

__all__ = ["connect", "Client", "Run"]
