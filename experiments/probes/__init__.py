"""One-off investigations, kept runnable: each measured a question once (what a pause costs on the
CPU, a pause that does not unwind, where fork_many's time goes) and its findings live in the
results notes that cite it (``experiments/results/cpu-2core/armed/README.md``,
``experiments/results/runs-recorded-as-4a92176.md``). The figures the README claims come from
``experiments/bench/``, not from here."""
