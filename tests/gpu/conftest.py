"""GPU-only tests: skipped where CUDA is absent (the CPU suite cannot reach CUDA graphs).

``DJINN_GPU_MODELS`` (space-separated ``load_model`` sources, default
``random:gpt2 random:llama-7b``) picks the models; ``experiments/gpu_exactness.py``
runs these tests on the device machine and writes their outcome as JSON.
"""
from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)
