"""The step loop's fast paths: a breakpoint's hooks stand between steps without changing any result.

Pausing at every step keeps the breakpoint's traces hooked (idle) from one step
to the next instead of adding and removing them; these tests check that idle
hooks change nothing for other runs, that they go away when the run ends, that
they hold no tensors (a closed run's KV cache is freed), and that the number of
standing points stays bounded.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from djinn_nb.core.engine import Engine
from djinn_nb.core.models import build_random
from djinn_nb.core.stepping import STANDING

PROMPT = [5, 17, 101, 3, 44, 9]
N = 6


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    return Engine(build_random("gpt2-tiny", seed=3), None, "gpt2-tiny")


def _plain(model: torch.nn.Module, n: int = N) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def _hooked(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def test_idle_hooks_change_nothing_and_leave_with_the_run(engine: Engine) -> None:
    ref = _plain(engine.model)
    run = engine.generate(PROMPT, N, breakpoints=[(6, "all")])
    assert run.paused and _hooked(engine.model) == ["transformer.h.6"]
    other = engine.generate(PROMPT, N)  # runs past the idle hooks of the paused run
    assert other.token_ids == ref
    seen = []
    while run.paused:
        seen.append(engine.activation(run.id).clone())
        engine.resume(run.id)
    assert run.token_ids == ref and len(seen) == N
    assert _hooked(engine.model) == []
    # each pause shows what a fresh one-step breakpoint shows, bit for bit
    for step in (0, N - 1):
        fresh = engine.generate(PROMPT, N, breakpoints=[(6, step)])
        assert torch.equal(engine.activation(fresh.id), seen[step])
        engine.close(fresh.id)
    engine.close(run.id)
    engine.close(other.id)


def test_inner_sites_pause_exactly_on_standing_hooks(engine: Engine) -> None:
    ref = _plain(engine.model)
    for site in ("resid_pre", "z", "attn_out", "resid_mid", "mlp_out"):
        run = engine.generate(PROMPT, N, breakpoints=[(4, "all", site)])
        steps = 0
        while run.paused:
            assert run.site == site and run.checkpoint.step == steps
            steps += 1
            engine.resume(run.id)
        assert steps == N and run.token_ids == ref, site
        engine.close(run.id)
    assert _hooked(engine.model) == []


def test_standing_points_are_bounded_and_hold_no_tensors(engine: Engine) -> None:
    ref = _plain(engine.model)
    runs = [engine.generate(PROMPT, N, breakpoints=[(layer, "all")]) for layer in range(STANDING + 3)]
    assert all(r.paused for r in runs)
    assert len(_hooked(engine.model)) == STANDING  # the least recently used were unhooked
    gone = weakref.ref(runs[-1].cache)
    engine.close(runs[-1].id)
    gc.collect()
    assert gone() is None  # the standing traces kept no reference to the closed run's cache
    for r in runs[:-1]:  # each re-hooks its point when it runs again
        while r.paused:
            engine.resume(r.id)
        assert r.token_ids == ref
        engine.close(r.id)
    assert _hooked(engine.model) == []
