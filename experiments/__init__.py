"""Benchmarks and the exp3 study; run them as modules from the repository root
(``python -m experiments.bench_fork ...``, ``python -m experiments.exp3_whitebox.run_exp3 ...``),
so they import the same ``djinn_nb`` as everything else and never patch ``sys.path``."""
