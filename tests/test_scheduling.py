"""Fair step-level scheduling, calls stopped between steps, and the NaN guard."""
from __future__ import annotations

import socket
import statistics
import threading
import time

import pytest
import rpyc
import torch

from djinn_nb.core.engine import Engine
from djinn_nb.core.models import build_random
from djinn_nb.core.reference import generate as hf_generate
from djinn_nb.core.kvcache import CacheMark
from djinn_nb.core.scheduler import FairScheduler
from djinn_nb.core.specs import Edit, Sampling
from djinn_nb.core.forking import ForkSpec
from djinn_nb.errors import ExecutionError, NonFiniteError
from djinn_nb import wire
from djinn_nb.wire.protocol import PROTOCOL
from djinn_nb.wire.transport import open_connection

PROMPT = [5, 17, 42, 99, 3, 250, 11, 7]


def test_turns_go_round_robin_across_owners_and_fifo_within_one():
    sched, order, threads = FairScheduler(), [], []
    sched.acquire("holder")
    for name in ("a1", "a2", "b1", "c1", "b2"):
        def wait(name: str = name) -> None:
            with sched.turn(name[0]):
                order.append(name)
        threads.append(threading.Thread(target=wait))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while sched.waiting() < len(threads) and time.monotonic() < deadline:
            time.sleep(0.001)
    sched.release()
    for t in threads:
        t.join(10)
    assert order == ["a1", "b1", "c1", "a2", "b2"]


def _fork_latency(run) -> float:
    t0 = time.perf_counter()
    child = run.fork(breakpoints=[], max_new_tokens=1)
    took = time.perf_counter() - t0
    child.close()
    return took


def test_a_fork_waits_about_one_step_of_another_users_long_generation(lab):
    alice, bob = lab.connect("alice"), lab.connect("bob")
    try:
        parked = bob.generate(PROMPT, max_new_tokens=2, breakpoints=[2])
        _fork_latency(parked)
        idle = statistics.median(_fork_latency(parked) for _ in range(7))
        result: dict = {}

        def long_generation() -> None:
            t0 = time.perf_counter()
            result["run"] = alice.generate(PROMPT, max_new_tokens=400)
            result["took"] = time.perf_counter() - t0

        gen = threading.Thread(target=long_generation)
        gen.start()
        time.sleep(0.3)  # the generation is stepping
        busy = [_fork_latency(parked) for _ in range(5)]
        still_running = gen.is_alive()
        gen.join(120)
        assert still_running, "the generation ended before the forks: it is too short to show anything"
        assert result["run"].done and len(result["run"].token_ids) == 400
        assert statistics.median(busy) <= 5 * idle, (busy, idle, result["took"])
        assert max(busy) < result["took"] / 4, (busy, result["took"])  # never waited for the whole generation
    finally:
        for c in (alice, bob):
            for r in c.runs():
                c.attach(r["id"]).close()
            c.close()


def test_a_call_whose_client_went_away_is_stopped_and_its_run_closed(lab):
    root = lab.connect("root")
    conn = open_connection("127.0.0.1", lab.port, ssl_context=root._ssl)
    try:
        assert wire.loads(conn.root.hello(PROTOCOL, lab.tokens["bob"]))["ok"]
        rpyc.async_(conn.root.generate)(wire.dumps({"prompt": PROMPT, "max_new_tokens": 400}))
        deadline = time.monotonic() + 10
        while not [r for r in root.runs() if r["state"] == "running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        running = [r["id"] for r in root.runs() if r["state"] == "running"]
        assert running, "the generation never started"
        t0 = time.monotonic()
        conn._channel.stream.sock.shutdown(socket.SHUT_RDWR)
        while running[0] in {r["id"] for r in root.runs()} and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        gone_after = time.monotonic() - t0
        assert running[0] not in {r["id"] for r in root.runs()}  # closed, not finished as "done"
        assert gone_after < 1.0, gone_after
    finally:
        conn.close()
        root.close()


# ----- the NaN guard (in-process engine: a GPT-2 whose layer norms overflow) ----------------
@pytest.fixture(scope="module")
def tiny():
    model = build_random("gpt2-tiny", seed=7)
    return Engine(model, None, "gpt2-tiny"), model


def test_non_finite_logits_fail_the_call_and_the_run_stays_paused_where_it_was(tiny):
    engine, model = tiny
    clean = engine.generate(PROMPT, 6, [(3, 0)], record_logits=True)
    want_logits = [l.clone() for l in engine.resume(clean.id).logits]
    run = engine.generate(PROMPT, 6, [(3, 0)], record_logits=True)
    before = (run.state, run.step, run.checkpoint.layer, list(run.token_ids), run.bytes_held())
    with pytest.raises(NonFiniteError, match=r"step 0 are not finite.*at layer 3 .*still paused at layer 3 step 0"):
        engine.resume(run.id, Edit(scale=1e20))  # block 3's output x1e20: block 4's layer norm overflows
    assert (run.state, run.step, run.checkpoint.layer, list(run.token_ids), run.bytes_held()) == before
    done = engine.resume(run.id)  # exactly as if the fault never happened
    assert done.token_ids == hf_generate(model, PROMPT, 6)
    assert all(torch.equal(a, b) for a, b in zip(done.logits, want_logits))


def test_a_fork_with_non_finite_logits_fails_is_closed_and_its_parent_is_untouched(tiny):
    engine, model = tiny
    parent = engine.generate(PROMPT, 6, [(3, 0)])
    with pytest.raises(NonFiniteError, match="layer 3"):
        engine.fork(parent.id, Edit(scale=1e20), [])
    assert [r for r in engine.all_runs() if r.parent == parent.id] == []  # the caller never got its id
    assert engine.resume(parent.id).token_ids == hf_generate(model, PROMPT, 6)


def test_a_failed_fork_many_closes_every_fork_it_made(tiny, monkeypatch):
    """Two forks run as a batch, two alone; the second alone fails (an injected fault) after the
    others finished: the caller gets the error and none of the forks, so none may stay listed."""
    engine, model = tiny
    parent = engine.generate(PROMPT, 6, [(3, 0)])
    specs = [ForkSpec(None, []), ForkSpec(Edit(scale=0.5), []), ForkSpec(None, [(5, 0)]), ForkSpec(None, [(6, 0)])]
    advance, calls = engine.stepper.advance, []

    def faulty(run, start):
        calls.append(run.id)
        if len(calls) == 2:
            raise RuntimeError("injected fault")
        return advance(run, start)

    monkeypatch.setattr(engine.stepper, "advance", faulty)
    with pytest.raises(ExecutionError, match="injected fault"):
        engine.fork_many(parent.id, specs)
    monkeypatch.undo()
    assert len(calls) == 2
    assert [r.id for r in engine.all_runs() if r.parent == parent.id] == []
    assert engine.resume(parent.id).token_ids == hf_generate(model, PROMPT, 6)


@pytest.mark.parametrize("site", ["resid_pre", "z", "resid_post"])
def test_a_pause_marks_its_cache_in_constant_time_and_the_mark_is_every_layers_length(tiny, site):
    """Past the first step a paused run's cache mark is the list of layers and two lengths (no
    per-layer copy); they are each layer's own length, and a failed call crops back to them."""
    engine, _ = tiny
    run = engine.generate(PROMPT, 6, [(3, 2, site)])
    first = engine.generate(PROMPT, 6, [(3, 0, site)])  # a first pass: later layers unset
    try:
        assert CacheMark(first.cache, first.checkpoint).state is not None
        mark = CacheMark(run.cache, run.checkpoint)
        assert mark.state is None and mark.split == 3 + (site != "resid_pre")
        done, rest = mark.lengths
        assert [layer.get_seq_length() for layer in run.cache.layers] == \
            [done if i < mark.split else rest for i in range(engine.num_layers)]
        assert done == len(PROMPT) + 2 and rest == done - 1
    finally:
        engine.close(run.id)
        engine.close(first.id)


@pytest.mark.parametrize("site", ["resid_pre", "z", "resid_post"])
def test_non_finite_logits_at_a_later_step_put_the_cache_back_value_for_value(tiny, site):
    engine, model = tiny
    clean = engine.generate(PROMPT, 6, [(3, 2, site)], record_logits=True)
    want = [l.clone() for l in engine.resume(clean.id).logits]
    run = engine.generate(PROMPT, 6, [(3, 2, site)], record_logits=True)
    layers = list(run.cache.layers)
    kv = [(layer.keys.clone(), layer.values.clone()) for layer in layers]
    before = (run.state, run.step, run.checkpoint, list(run.token_ids), len(run.logits), run.bytes_held())
    with pytest.raises(NonFiniteError, match="step 2 are not finite.*still paused at layer 3 step 2"):
        engine.resume(run.id, Edit(scale=1e30))  # overflows in the layers after the pause
    assert (run.state, run.step, run.checkpoint, list(run.token_ids), len(run.logits), run.bytes_held()) == before
    assert list(run.cache.layers) == layers
    assert all(torch.equal(layer.keys, k) and torch.equal(layer.values, v) for layer, (k, v) in zip(layers, kv))
    done = engine.resume(run.id)
    assert done.token_ids == hf_generate(model, PROMPT, 6)
    assert all(torch.equal(a, b) for a, b in zip(done.logits, want))


def test_a_sampled_run_with_non_finite_logits_also_stays_paused_and_resumes_its_own_samples(tiny):
    """Sampling drew from the NaN probabilities before the guard saw them (a raw torch error that
    failed the run; on CUDA a device assert): now the guard acts, and the generator is put back."""
    engine, _ = tiny
    want = engine.resume(engine.generate(PROMPT, 6, [(3, 0)], Sampling(1.0, 0, 3)).id).token_ids
    run = engine.generate(PROMPT, 6, [(3, 0)], Sampling(1.0, 0, 3))
    with pytest.raises(NonFiniteError, match=r"layer 3 .*still paused at layer 3 step 0"):
        engine.resume(run.id, Edit(scale=1e20))
    assert (run.state.value, run.step, run.checkpoint.layer, run.token_ids) == ("paused", 0, 3, [])
    assert engine.resume(run.id).token_ids == want


@pytest.mark.parametrize("temperature, top_k", [(5e-324, 0), (1e-320, 0), (1e-45, 5)])
def test_a_temperature_so_small_that_the_scores_overflow_samples_the_argmax(tiny, temperature, top_k):
    """logit / temperature is +-inf there (softmax NaN, multinomial raised): the limit is greedy."""
    engine, model = tiny
    run = engine.generate(PROMPT, 6, [], Sampling(temperature, top_k, 1))
    assert (run.state.value, run.error) == ("done", None)
    assert run.token_ids == hf_generate(model, PROMPT, 6)
