"""A long step hands the device on between its blocks, exactly (core/stepping.py ``SLICE_TOKENS``).

Plain HF (``model(ids)``, ``generate``) and torch hooks are the reference: the split step's
logits, tokens, pause values and watches equal them bit for bit; and another owner's call,
queued while a long prompt pass is in its first blocks, runs before that pass's next block.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from djinn_nb.core import batch
from djinn_nb.core.engine import Engine
from djinn_nb.core.forking import ForkSpec
from djinn_nb.core.models import build_random
from djinn_nb.core.reference import generate as hf_generate
from djinn_nb.core.pause import output_hidden
from djinn_nb.core.scheduler import FairScheduler
from djinn_nb.core.specs import Edit
from djinn_nb.core.stepping import SLICE_TOKENS

LONG = [(7 * i + 3) % 512 for i in range(150)]
SHORT = [5, 17, 42, 99, 3, 250, 11, 7]


@pytest.fixture(scope="module")
def tiny():
    model = build_random("gpt2-tiny", seed=11)
    return Engine(model, None, "gpt2-tiny"), model


def _counting(engine: Engine) -> list[int]:
    engine._device_lock.contended_until = 0.0  # no one has waited: whole blocks
    calls: list[int] = []
    handed = engine.stepper.between_blocks

    def counted() -> None:
        calls.append(1)
        handed()
    engine.stepper.between_blocks = counted
    return calls


def test_a_long_prompt_pass_is_split_between_blocks_and_equals_plain_hf(tiny):
    engine, model = tiny
    assert len(LONG) >= SLICE_TOKENS > len(SHORT)
    calls = _counting(engine)
    try:
        run = engine.generate(LONG, max_new_tokens=5, record_logits=True)
        assert len(calls) == engine.num_layers - 1  # between every two blocks of the prompt pass, none after
        calls.clear()
        engine.close(engine.generate(SHORT, max_new_tokens=3).id)
        assert calls == []  # a short step is the model's own forward
    finally:
        engine.stepper.between_blocks = engine._device_lock.yield_turn
    with torch.inference_mode():
        ref_logits = model(torch.tensor([LONG]), logits_to_keep=1).logits[0, -1]  # as generate computes it
    assert torch.equal(run.logits[0].reshape(-1).to(ref_logits.dtype), ref_logits)
    assert list(run.token_ids) == hf_generate(model, LONG, 5)
    engine.close(run.id)


def test_while_others_wait_a_long_step_also_hands_the_device_on_inside_each_block(tiny, monkeypatch):
    """Split at resid_mid (between attention and MLP) as a breakpoint there splits it: the same
    logits and tokens as plain HF, bit for bit, and a turn offered twice per block."""
    engine, model = tiny
    calls = _counting(engine)
    monkeypatch.setattr(engine.stepper, "contended", lambda: True)
    try:
        run = engine.generate(LONG, max_new_tokens=4, record_logits=True)
    finally:
        engine.stepper.between_blocks = engine._device_lock.yield_turn
    assert len(calls) == 2 * (engine.num_layers - 1)  # before and inside blocks 1..11 (block 0 runs whole)
    with torch.inference_mode():
        ref_logits = model(torch.tensor([LONG]), logits_to_keep=1).logits[0, -1]
    assert torch.equal(run.logits[0].reshape(-1).to(ref_logits.dtype), ref_logits)
    assert list(run.token_ids) == hf_generate(model, LONG, 4)
    engine.close(run.id)


def test_a_llama_long_step_split_inside_its_blocks_equals_plain_hf():
    model = build_random("llama-tiny", seed=5)
    engine = Engine(model, None, "llama-tiny")
    engine.stepper.contended = lambda: True
    run = engine.generate(LONG, max_new_tokens=4, record_logits=True)
    with torch.inference_mode():
        ref_logits = model(torch.tensor([LONG]), logits_to_keep=1).logits[0, -1]
    assert torch.equal(run.logits[0].reshape(-1).to(ref_logits.dtype), ref_logits)
    assert list(run.token_ids) == hf_generate(model, LONG, 4)


def test_the_device_counts_as_contended_only_after_someone_waited():
    sched = FairScheduler()
    assert not sched.contended()
    sched.acquire("a")
    waiter = threading.Thread(target=lambda: (sched.acquire("b"), sched.release()))
    waiter.start()
    deadline = time.monotonic() + 10
    while sched.waiting() < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert sched.contended()
    sched.yield_turn("a")  # b takes its turn and gives it back
    waiter.join(10)
    sched.release()
    sched.contended_until = time.monotonic() - 1
    sched.acquire("a")  # a free device: no wait, no contention
    sched.release()
    assert not sched.contended()


def test_a_breakpoint_and_a_watch_inside_a_split_step_equal_torch_hooks(tiny):
    engine, model = tiny
    seen: dict[str, torch.Tensor] = {}
    def keep(name: str):
        def hook(module, args, out) -> None:  # returns None: the forward goes on unchanged
            seen.setdefault(name, output_hidden(out).clone())
        return hook
    hooks = [model.transformer.h[7].register_forward_hook(keep("post7")),
             model.transformer.h[3].mlp.register_forward_hook(keep("mlp3"))]
    try:
        with torch.inference_mode():
            model(torch.tensor([LONG]))
    finally:
        for h in hooks:
            h.remove()
    run = engine.generate(LONG, max_new_tokens=4, breakpoints=[{"layer": 7, "step": 0}],
                          watches=[{"layer": 3, "site": "mlp_out", "step": 0}])
    assert run.checkpoint is not None and (run.checkpoint.layer, run.checkpoint.step) == (7, 0)
    assert torch.equal(run.checkpoint.hidden, seen["post7"])
    hits = engine.watched(run.id)
    assert [(w.layer, w.step, w.site) for w in hits] == [(3, 0, "mlp_out")]
    assert torch.equal(hits[0].tensor.reshape(seen["mlp3"].shape), seen["mlp3"])
    engine.resume(run.id)
    assert list(run.token_ids) == hf_generate(model, LONG, 4)


@pytest.mark.attack(cls="fairness", tried="a fork queued during another user's 150-position prompt pass",
                    held="it runs before that pass's next block, not after the whole step")
def test_another_owners_fork_runs_between_two_blocks_of_a_long_prompt_pass(tiny):
    """Without the split, the fork queued during block 1 would wait for all 12 blocks."""
    engine, model = tiny
    parked = engine.generate(SHORT, max_new_tokens=3, breakpoints=[{"layer": 5, "step": 1}], owner="vera")
    events: list[str] = []
    victim: dict = {}
    sched = engine._device_lock

    def fork_as_vera() -> None:
        victim["run"] = engine.fork(parked.id, breakpoints=[], owner="vera", max_new_tokens=3)

    def on_block(layer: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if h.shape[1] == len(LONG):
                events.append(f"long {layer}")
                if layer == 1 and "thread" not in victim:
                    victim["thread"] = threading.Thread(target=fork_as_vera)
                    victim["thread"].start()
                    deadline = time.monotonic() + 10
                    while sched.waiting() < 1 and time.monotonic() < deadline:
                        time.sleep(0.001)
            elif layer == engine.num_layers - 1:
                events.append("fork's last block")
        return hook

    handles = [model.transformer.h[i].register_forward_pre_hook(on_block(i), with_kwargs=True) for i in (1, 2, 11)]
    try:
        long_run = engine.generate(LONG, max_new_tokens=2, owner="mal")
        victim["thread"].join(30)
    finally:
        for h in handles:
            h.remove()
    assert events.index("fork's last block") < events.index("long 2"), events
    assert victim["run"].token_ids[:len(parked.token_ids)] == parked.token_ids
    assert list(long_run.token_ids) == hf_generate(model, LONG, 2)  # the hand-off changed nothing


def test_a_wide_fork_many_runs_its_step_in_groups_of_rows_and_equals_single_forks(tiny, monkeypatch):
    """8 forks of a run paused in its 150-token prompt pass: 1,200 positions, run 2 rows at a time
    (``GROUP_TOKENS`` lowered to 300), the device handed on between groups and blocks."""
    engine, model = tiny
    parent = engine.generate(LONG, max_new_tokens=3, breakpoints=[{"layer": 4, "step": 0}], owner="mal")
    scales = [0.0, 0.5, 0.9, 1.0, 1.1, 1.5, 2.0, 3.0]
    singles = [engine.fork(parent.id, Edit(scale=s), breakpoints=[], owner="mal") for s in scales]
    monkeypatch.setattr(batch, "GROUP_TOKENS", 300)
    calls = _counting(engine)
    try:
        many = engine.fork_many(parent.id, [ForkSpec(Edit(scale=s), []) for s in scales], owner="mal")
    finally:
        engine.stepper.between_blocks = engine._device_lock.yield_turn
    assert many[0].continued_by == "batch of 8, in groups of 2"
    assert len(calls) == 4 * (engine.num_layers - 5) + 3  # blocks 5..11 of each group; three between groups
    assert [m.token_ids for m in many] == [s.token_ids for s in singles]
    # a batched row need not equal the row alone in the last bits (batch.py); the groups add no more
    worst = max((m.last_logits - s.last_logits).abs().max().item() for m, s in zip(many, singles))
    monkeypatch.setattr(batch, "GROUP_TOKENS", 10**9)
    whole = engine.fork_many(parent.id, [ForkSpec(Edit(scale=s), []) for s in scales], owner="mal")
    assert whole[0].continued_by == "batch of 8"
    assert [w.token_ids for w in whole] == [m.token_ids for m in many]
    assert worst <= 1e-5 * max(1.0, max(s.last_logits.abs().max().item() for s in singles)), worst
    with torch.inference_mode():  # scale 1.0 changes nothing: plain HF's tokens
        assert list(many[3].token_ids) == hf_generate(model, LONG, 3)
