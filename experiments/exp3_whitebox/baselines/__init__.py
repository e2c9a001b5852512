"""Baselines of the exp3 experiment: plain PyTorch with hooks, and vLLM."""
