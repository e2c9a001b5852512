"""Exactness on the GPU: paused/resumed runs and forks (eager, captured, then replayed as a CUDA
graph) give exactly the tokens of plain HF ``generate`` with the same edit made by a torch hook
(``djinn_nb.core.reference``). The CPU suite checks the same on the eager path; only here do forks
reach the graph path, so these are the checks that the graph replay is exact."""
from __future__ import annotations

import pytest
import torch

from djinn_nb.core import reference
from djinn_nb.core.engine import Engine
from djinn_nb.core.specs import Edit

SEQ, NEW = 128, 8  # the engine fixture (one per model of DJINN_GPU_MODELS) is conftest.py's


@pytest.fixture(scope="module")
def prompt(engine: Engine) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, engine.info()["vocab_size"], (SEQ,), generator=gen).tolist()


def hf(engine: Engine, prompt: list[int], layer: int | None = None, factor: float = 1.0, call: int = 0) -> list[int]:
    if layer is None:
        return reference.generate(engine.model, prompt, NEW)
    return reference.generate(engine.model, prompt, NEW, edit_layer=layer, edit_call=call, edit=reference.scale(factor))


def test_breakpoints_resumed_unmodified_equal_generate(engine, prompt):
    L = engine.num_layers
    run = engine.generate(prompt, NEW, breakpoints=[L // 4, L // 2, 3 * L // 4])
    pauses = 0
    while run.paused:
        pauses += 1
        engine.resume(run.id)
    assert pauses == 3
    assert run.token_ids == hf(engine, prompt)
    engine.close(run.id)


def test_repeated_forks_replay_a_graph_and_equal_the_hook(engine, prompt):
    """Forks 1.. of one checkpoint: the first eager, then captured, then replayed; each exact."""
    mid = engine.num_layers // 2
    parent = engine.generate(prompt, NEW, breakpoints=[mid])
    ways = []
    for factor in [0.9, 0.9, 0.9, 0.5, 1.5, 0.9]:
        child = engine.fork(parent.id, edit=Edit(scale=factor), breakpoints=[])
        assert child.token_ids == hf(engine, prompt, mid, factor), (factor, child.continued_by)
        ways.append(child.continued_by)
        engine.close(child.id)
    if engine.cuda_graphs:
        assert "cuda-graph" in ways, ways
    engine.resume(parent.id)
    assert parent.token_ids == hf(engine, prompt), "forks must not disturb their parent"
    engine.close(parent.id)


def test_decode_step_forks_equal_the_hook_on_that_call(engine, prompt):
    mid = engine.num_layers // 2
    parent = engine.generate(prompt, NEW, breakpoints=[(mid, 3)])
    want = hf(engine, prompt, mid, 0.5, call=3)
    for _ in range(4):
        child = engine.fork(parent.id, edit=Edit(scale=0.5), breakpoints=[])
        assert child.token_ids == want, child.continued_by
        engine.close(child.id)
    engine.close(parent.id)


@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 1e-30])
def test_a_vanishing_temperature_samples_the_greedy_tokens(engine, prompt, temperature):
    """CUDA divides by a scalar as a multiplication by its reciprocal, which overflows for a
    temperature under float32's least normal number: such a run must still sample the argmax,
    paused at every step or not, never a uniform draw from NaN probabilities."""
    from djinn_nb.core.specs import Sampling

    greedy = engine.generate(prompt, NEW)
    sampled = engine.generate(prompt, NEW, sampling=Sampling(temperature, 0, 3))
    paused = engine.generate(prompt, NEW, breakpoints=[(engine.num_layers // 2, "all")],
                             sampling=Sampling(temperature, 0, 3))
    while paused.paused:
        engine.resume(paused.id)
    assert sampled.token_ids == paused.token_ids == greedy.token_ids
    for r in (greedy, sampled, paused):
        engine.close(r.id)
