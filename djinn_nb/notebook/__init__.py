"""The notebook layer: magics, HTML views, widgets, plots and metrics. Only the client API.

``magics`` (with ``magic_args`` for their arguments), ``display`` (HTML of runs and
activations), ``widgets`` (the steering slider), ``plots`` and ``metrics``.
"""
