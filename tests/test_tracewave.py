"""The residual-stream grid as one wave through the blocks (core/tracewave.py).

Reference: plain HF with a torch hook restoring the clean value at (layer, position) in the
corrupted prompt's forward, one forward per cell.
"""
from __future__ import annotations

import pytest
import torch

from djinn_nb.core import tracewave
from djinn_nb.core.engine import Engine
from djinn_nb.core.models import build_random
from djinn_nb.core.patchgrid import GridSpec
from djinn_nb.core.pause import output_hidden

CLEAN = [5, 17, 42, 99, 3, 250, 11, 7, 64, 300]
CORRUPT = [5, 17, 42, 98, 3, 250, 11, 7, 64, 300]
ANSWER = 9


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def tiny(request):
    model = build_random(request.param, seed=3)
    return Engine(model, None, request.param), model


def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def hook_cell(model, layer: int, position: int, site: str) -> float:
    """p(ANSWER) of the corrupted prompt with the clean value at (layer, site) restored at ``position``."""
    block = _blocks(model)[layer]
    seen: dict[str, torch.Tensor] = {}

    def record(module, args, kwargs, out=None):
        h = (args[0] if args else kwargs["hidden_states"]) if out is None else output_hidden(out)
        seen["clean"] = h.clone()

    def restore_pre(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, position] = seen["clean"][:, position]
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    def restore_post(module, args, kwargs, out):
        h = output_hidden(out).clone()
        h[:, position] = seen["clean"][:, position]
        return h if isinstance(out, torch.Tensor) else (h, *out[1:])

    with torch.inference_mode():
        if site == "resid_pre":
            handle = block.register_forward_pre_hook(record, with_kwargs=True)
        else:
            handle = block.register_forward_hook(lambda m, a, k, o: record(m, a, k, o), with_kwargs=True)
        model(torch.tensor([CLEAN]))
        handle.remove()
        if site == "resid_pre":
            handle = block.register_forward_pre_hook(restore_pre, with_kwargs=True)
        else:
            handle = block.register_forward_hook(restore_post, with_kwargs=True)
        try:
            logits = model(torch.tensor([CORRUPT])).logits[0, -1]
        finally:
            handle.remove()
    return float(logits.float().softmax(-1)[ANSWER])


@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
def test_every_cell_of_the_wave_equals_a_hook_patching_one_position(tiny, site):
    engine, model = tiny
    layers = [0, 3, 7, engine.num_layers - 1]
    grid = engine.causal_trace(CLEAN, CORRUPT, ANSWER, layers=layers, site=site)
    assert len(grid.rows) == len(layers)
    for i, layer in enumerate(layers):
        for p in (0, 3, len(CLEAN) - 1):
            assert grid.rows[i][p] == pytest.approx(hook_cell(model, layer, p, site), rel=1e-5, abs=1e-7)
    with torch.inference_mode():
        corrupt = model(torch.tensor([CORRUPT])).logits[0, -1].float().softmax(-1)[ANSWER].item()
    assert grid.corrupt_prob == pytest.approx(corrupt, rel=1e-5)
    assert engine.runs() == []  # nothing kept


def test_waves_split_the_layers_by_positions_and_keep_a_layers_rows_together(monkeypatch):
    spec = GridSpec("resid_post", list(range(6)), list(range(10)), [], {layer: list(range(10)) for layer in range(6)})
    monkeypatch.setattr(tracewave, "WAVE_TOKENS", 10 * 25)  # 1 + 2 layers of 10 rows fit, not 3
    assert tracewave.waves(spec, 10) == [[0, 1], [2, 3], [4, 5]]
    monkeypatch.setattr(tracewave, "WAVE_TOKENS", 10)  # less than one layer: a layer a wave, never split
    assert tracewave.waves(spec, 10) == [[layer] for layer in range(6)]
    monkeypatch.setattr(tracewave, "WAVE_TOKENS", 1 << 20)
    assert tracewave.waves(spec, 10) == [list(range(6))]


def test_a_grid_in_many_waves_equals_it_in_one_and_cells_compute_only_those(tiny, monkeypatch):
    engine, _ = tiny
    one = engine.causal_trace(CLEAN, CORRUPT, ANSWER)
    monkeypatch.setattr(tracewave, "WAVE_TOKENS", 3 * len(CLEAN) * len(CLEAN))  # two layers a wave
    calls: list[int] = []
    handed = engine.stepper.between_blocks
    engine.stepper.between_blocks = lambda: (calls.append(1), handed())[1]
    try:
        many = engine.causal_trace(CLEAN, CORRUPT, ANSWER)
    finally:
        engine.stepper.between_blocks = handed
    waves = -(-engine.num_layers // 2)
    assert len(calls) == waves * (engine.num_layers - 1)  # the device offered between every two blocks
    for a, b in zip(one.rows, many.rows):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    assert many.corrupt_prob == pytest.approx(one.corrupt_prob, rel=1e-6)
    spec = GridSpec("resid_post", list(range(engine.num_layers)), list(range(len(CLEAN))), [], {2: [1, 4], 5: [0]})
    some = engine.causal_trace(CLEAN, CORRUPT, ANSWER, spec=spec)
    assert len(some.rows) == 2  # only the layers with a cell
    assert [j for j, v in enumerate(some.rows[0]) if v == v] == [1, 4]
    assert [j for j, v in enumerate(some.rows[1]) if v == v] == [0]
    assert some.rows[0][4] == pytest.approx(one.rows[2][4], rel=1e-5, abs=1e-7)
