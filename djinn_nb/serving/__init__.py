"""Serving: the core behind rpyc, to clients in other processes or on other machines. No IPython.

- ``service``: one connection (hello; each ``exposed_`` call handed to its call group); the groups
  (``run_calls``, ``read_calls``, ``debug_calls``, ``text_calls``, ``sae_calls``, ``branch_calls``,
  ``patching_calls``, ``transfers``) are given the narrow interfaces of ``parts`` (``context``: the
  caller; ``requests``: edits checked), never the service; ``replies``: how every call checks its
  arguments and answers; ``run_views``: a core run's brief, row, summary and history as the
  wire's typed messages (core knows nothing of the wire).
- ``server``: the listener, leases, the budget; ``lease``: what a lease may be; ``users``: tokens
  and quotas; ``embedded``: the in-process server ``connect(embedded=True)`` starts; ``localserver``:
  the per-user background server ``connect()`` starts (``localhome``: its private files).
- ``cli``: ``djinn-server`` (also ``python -m djinn_nb.serving``).

What crosses the wire (the typed messages, the codec, the protocol's constants, the transport,
the side channel, TLS) is ``djinn_nb.wire``, which the client imports too.
"""
