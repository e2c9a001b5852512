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


def _reference_sites(model: torch.nn.Module, layer: int, step: int) -> dict[str, torch.Tensor]:
    """Every site of block ``layer`` at ``step`` of HF's own greedy generation, read with plain hooks."""
    block = model.transformer.h[layer]
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name, value):
        seen.setdefault(name, []).append(value.detach().clone())

    hooks = [
        block.register_forward_pre_hook(lambda m, a, k: keep("resid_pre", a[0] if a else k["hidden_states"]),
                                        with_kwargs=True),
        block.attn.c_proj.register_forward_pre_hook(lambda m, a: keep("z", a[0])),
        block.attn.register_forward_hook(lambda m, a, o: keep("attn_out", o[0] if isinstance(o, tuple) else o)),
        block.ln_2.register_forward_pre_hook(lambda m, a: keep("resid_mid", a[0])),
        block.mlp.register_forward_hook(lambda m, a, o: keep("mlp_out", o)),
        block.register_forward_hook(lambda m, a, o: keep("resid_post", o[0] if isinstance(o, tuple) else o)),
    ]
    try:
        _plain(model)
    finally:
        for h in hooks:
            h.remove()
    heads = model.config.n_head
    out = {name: values[step] for name, values in seen.items()}
    out["z"] = out["z"].unflatten(-1, (heads, out["z"].shape[-1] // heads))
    return out


def test_a_standing_pause_holds_what_hf_computed_at_every_site(engine: Engine) -> None:
    """The pause's value and the earlier sites it keeps, read from the standing traces, are
    HF's own values at that step, bit for bit; and continuing from them gives HF's tokens."""
    layer, step = 4, 2
    ref = _reference_sites(engine.model, layer, step)
    tokens = _plain(engine.model)
    for site in ("resid_pre", "z", "attn_out", "resid_mid", "mlp_out", "resid_post"):
        run = engine.generate(PROMPT, N, breakpoints=[(layer, "all", site)])
        while run.checkpoint.step < step:
            engine.resume(run.id)
        cp = run.checkpoint
        assert torch.equal(engine.activation(run.id), ref[site]), site
        assert set(cp.saved) == {"resid_pre", *engine.parts[layer].needs(site)}, site
        for name, value in cp.saved.items():
            assert torch.equal(value, ref[name]), (site, name)
        fork = engine.fork(run.id, None, [])
        assert fork.token_ids == tokens, site
        while run.paused:
            engine.resume(run.id)
        assert run.token_ids == tokens, site
        engine.close(run.id)
        engine.close(fork.id)


def test_armed_steps_enter_the_base_model_only_where_it_computes_the_same(engine: Engine) -> None:
    """GPT-2's wrapper calls its base model with the same inputs: armed steps enter there. A
    wrapper that changes the inputs on the way keeps the whole model as the entry, and its
    breakpoints still reproduce its own generation."""
    assert engine.stepper._entry is engine.model.transformer

    model = build_random("gpt2-tiny", seed=3)
    own = model.forward

    def shifted(input_ids=None, past_key_values=None, logits_to_keep=0, **kw):  # what its base model does not
        if past_key_values is not None:
            kw["past_key_values"] = past_key_values
        return own(input_ids=(input_ids + 1) % model.config.vocab_size, logits_to_keep=logits_to_keep, **kw)

    model.forward = shifted
    engine2 = Engine(model, None, "shifted")
    assert engine2.stepper._entry is model and engine2.inexact_sites == {}
    ref = _plain(model)
    assert ref != _plain(engine.model)  # the shift matters
    run = engine2.generate(PROMPT, N, breakpoints=[(6, "all")])
    while run.paused:
        engine2.resume(run.id)
    assert run.token_ids == ref


def test_same_call_tells_a_one_ulp_difference_another_cache_and_unknown_objects_apart() -> None:
    from djinn_nb.core.entry import same_call

    t = torch.randn(2, 3)
    nudged = t.clone()
    nudged[1, 2] = torch.nextafter(nudged[1, 2], torch.tensor(1e9))
    a, b = object(), object()
    assert same_call((t, {"cache": a, "n": 3}), (t.clone(), {"cache": b, "n": 3}), a, b)
    assert not same_call((t, {"cache": a}), (nudged, {"cache": b}), a, b)
    assert not same_call({"cache": a}, {"cache": a}, a, b)  # the copy must be its own cache
    assert not same_call(t, t.double(), a, b) and not same_call((t,), [t], a, b)
    assert not same_call({"mask": object()}, {"mask": object()}, a, b)
