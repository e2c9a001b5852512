"""The command-line options every generation benchmark shares: which model, where, how long.

One definition, so the benchmarks that time the same kind of run (a prompt of ``--seq``
random ids, ``--new-tokens`` greedy steps) take the same options with the same defaults.
"""
from __future__ import annotations

import argparse

import torch


def add_generation_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--model --device --dtype --seq --new-tokens`` (a random GPT-2 shape, 128 + 64 tokens, on CUDA if present)."""
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    return p
