"""Serving: the core behind rpyc, to clients in other processes or on other machines. No IPython.

- ``protocol``: constants both ends agree on; ``schema`` (top level): the typed messages that cross.
- ``wire``: JSON and ``(dtype, shape, bytes)`` tensors, validated on arrival.
- ``transport``: rpyc's channel without compression, TCP_NODELAY, bounded frames.
- ``sidechannel``: a ticketed bulk socket for tensors of 1 MiB or more.
- ``service``: the ``exposed_`` calls, one connection each; ``server``: the listener, leases, the budget.
- ``cli``: ``djinn-server`` (also ``python -m djinn_nb.serving``).
"""
