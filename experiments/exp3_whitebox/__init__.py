"""Experiment 3, white-box breakpoint debugging (see README.md here): ``run_exp3`` and its parts."""
