"""Benchmarks, probes and the exp3 study; run them as modules from the repository root
(``python -m experiments.bench.fork ...``, ``python -m experiments.exp3_whitebox.run_exp3 ...``),
so they import the same ``djinn_nb`` as everything else and never patch ``sys.path``.

- ``bench/``: one script per figure the README and docs/results.md claim, each writing one JSON
  through ``exp3_whitebox/exp3lib/env.py``'s ``write_json`` (machine, dtype, versions, commit);
- ``probes/``: one-off investigations whose findings live in the results notes;
- ``harness/``: what benchmarks and tests share to run a client against a server (a server
  process, a link with latency, a request counter);
- ``exp3_whitebox/``: the white-box breakpoint study and ``exp3lib``, whose ``cli.py`` (the shared
  ``--model --device --dtype --seq --new-tokens`` options) and ``env.py`` every benchmark uses;
- ``results/``: what ran, per machine; ``results/INDEX.md`` is generated (``make results-index``).

Nothing runnable sits at this top level (``tests/test_experiments.py`` checks).
"""
