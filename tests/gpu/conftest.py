"""GPU-only tests: skipped where CUDA is absent (the CPU suite cannot reach CUDA graphs).

``DJINN_GPU_MODELS`` (space-separated ``load_model`` sources, default
``random:gpt2 random:llama-7b``) picks the models; ``experiments/bench/gpu_exactness.py``
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


#: ``load_model`` sources, space-separated in ``DJINN_GPU_MODELS``.
GPU_MODELS = os.environ.get("DJINN_GPU_MODELS", "random:gpt2 random:llama-7b").split()


@pytest.fixture(scope="module", params=GPU_MODELS)
def engine(request):
    """An engine on ``cuda:0`` per model of ``GPU_MODELS`` (bf16 for the 7B shape, else fp32)."""
    from djinn_nb.core.engine import Engine
    from djinn_nb.core.models import load_model

    source = request.param
    loaded = load_model(source, device="cuda:0", dtype="bfloat16" if "7b" in source else "float32")
    eng = Engine(loaded.model, loaded.tokenizer, source)
    yield eng
    del eng, loaded
    torch.cuda.empty_cache()
