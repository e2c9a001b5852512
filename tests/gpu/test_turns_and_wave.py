"""On the GPU: a long step split between and inside its blocks equals the model's own forward bit
for bit, and the residual-stream trace's wave equals a torch hook patching one cell."""
from __future__ import annotations

import pytest
import torch

from djinn_nb.core import stepping
from djinn_nb.core.engine import Engine
from djinn_nb.core.pause import output_hidden

from test_gpu_exactness import hf  # tests/gpu is on the path; the engine fixture is conftest.py's


def _prompt(engine: Engine, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, engine.info()["vocab_size"], (n,), generator=gen).tolist()


@pytest.mark.parametrize("inside", [False, True])
def test_a_split_prompt_pass_equals_the_models_own_forward(engine, inside, monkeypatch):
    prompt = _prompt(engine, 200)
    monkeypatch.setattr(stepping, "SLICE_TOKENS", 1 << 30)
    whole = engine.generate(prompt, max_new_tokens=8, record_logits=True)
    monkeypatch.setattr(stepping, "SLICE_TOKENS", 64)
    monkeypatch.setattr(engine.stepper, "contended", lambda: inside)
    split = engine.generate(prompt, max_new_tokens=8, record_logits=True)
    assert split.token_ids == whole.token_ids
    assert all(torch.equal(a, b) for a, b in zip(split.logits, whole.logits))
    assert list(split.token_ids) == hf(engine, prompt)
    for run in (whole, split):
        engine.close(run.id)


def test_the_trace_wave_equals_a_hook_patching_one_cell(engine):
    clean, corrupt = _prompt(engine, 12), _prompt(engine, 12)
    corrupt[4] = (corrupt[4] + 1) % engine.info()["vocab_size"]
    grid = engine.causal_trace(clean, corrupt, 7, layers=[0, engine.num_layers // 2], site="resid_post")
    blocks = engine.anatomy.blocks
    for row, layer in zip(grid.rows, [0, engine.num_layers // 2]):
        seen: dict[str, torch.Tensor] = {}

        def keep(module, args, out, seen=seen) -> None:  # records; returns None: the output unchanged
            seen["v"] = output_hidden(out).clone()
        handle = blocks[layer].register_forward_hook(keep)
        with torch.inference_mode():
            engine.model(torch.tensor([clean], device=engine.device))
        handle.remove()
        for p in (0, 4, 11):
            def put(module, args, out, p=p, clean_h=seen["v"]):
                h = output_hidden(out).clone()
                h[:, p] = clean_h[:, p]
                return h if isinstance(out, torch.Tensor) else (h, *out[1:])
            handle = blocks[layer].register_forward_hook(put)
            try:
                with torch.inference_mode():
                    logits = engine.model(torch.tensor([corrupt], device=engine.device)).logits[0, -1]
            finally:
                handle.remove()
            want = logits.float().softmax(-1)[7].item()
            tol = 1e-6 if engine.dtype == torch.float32 else 2e-3
            assert row[p] == pytest.approx(want, abs=tol)
