"""The command-line options every benchmark that loads a model shares: which model, where, how long.

One definition, so the benchmarks that time the same kind of run (a prompt of ``--seq``
random ids, ``--new-tokens`` greedy steps) take the same options with the same defaults.
A benchmark whose figure was measured with other defaults passes them (``dtype="float32"``),
so its command lines keep measuring what they measured.
"""
from __future__ import annotations

import argparse

import torch

_AUTO = object()


def add_model_args(p: argparse.ArgumentParser, *, model: str | None = "random:gpt2", device: object = _AUTO,
                   dtype: str | None = None, model_help: str | None = None) -> argparse.ArgumentParser:
    """``--model --device --dtype`` (a random GPT-2 shape on CUDA if present; the dtype the loader picks)."""
    p.add_argument("--model", default=model, help=model_help)
    p.add_argument("--device", default=("cuda:0" if torch.cuda.is_available() else "cpu") if device is _AUTO else device)
    p.add_argument("--dtype", default=dtype)
    return p


def add_generation_args(p: argparse.ArgumentParser, *, seq: int = 128, new_tokens: int | None = 64,
                        model: str = "random:gpt2", device: object = _AUTO,
                        dtype: str | None = None) -> argparse.ArgumentParser:
    """``--model --device --dtype --seq --new-tokens`` (128 + 64 tokens unless given; ``new_tokens=None``:
    no ``--new-tokens``, for a benchmark that always runs to one token)."""
    add_model_args(p, model=model, device=device, dtype=dtype)
    p.add_argument("--seq", type=int, default=seq)
    if new_tokens is not None:
        p.add_argument("--new-tokens", type=int, default=new_tokens)
    return p
