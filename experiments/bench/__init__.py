"""Benchmarks that write one JSON each under ``experiments/results/<machine>/`` (machine, dtype,
versions and commit included). Run as modules from the repository root."""
