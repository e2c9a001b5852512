"""A debugger's control flow — conditional breakpoints, next_layer/next_step, rewind, history — against
plain HF ``generate(output_logits=True)`` and fresh unconditional breakpoints (CPU, fp32)."""
from __future__ import annotations

import time

import pytest
import torch

import djinn_nb
from djinn_nb.core.reference import generate, hf_model
from djinn_nb.errors import BreakpointError, DjinnError, UnknownRunError

PROMPT = [5, 17, 42, 99, 3, 250, 11, 7]
N = 10
LAYER = 1


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def setup(request, saved_models):
    path = saved_models[request.param]
    model = hf_model(path)
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=N, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    logits = torch.stack(out.logits)[:, 0].float()  # (steps, vocab)
    return djinn_nb.connect(model=path, device="cpu"), model, out.sequences[0, len(PROMPT):].tolist(), logits


def fresh_pause(client, layer, step, site="resid_post"):
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(layer, step, site)])
    act = run.activation()
    run.close()
    return act


def walk(run):
    seen = []
    while run.paused:
        seen.append((run.step, run.activation()))
        run.resume()
    return seen


def test_top1_prob_condition_pauses_at_exactly_the_reference_steps(setup):
    client, _, tokens, logits = setup
    top1 = logits.softmax(-1).max(-1).values.tolist()
    ranked = sorted(top1)
    t = (ranked[N // 2 - 1] + ranked[N // 2]) / 2  # about half the steps, far from any one of them
    expected = [s for s, p in enumerate(top1) if p < t]
    assert 0 < len(expected) < N
    run = client.generate(PROMPT, max_new_tokens=N,
                          breakpoints=[{"layer": LAYER, "step": "all", "when": f"top1_prob < {t!r}"}])
    seen = walk(run)
    assert [s for s, _ in seen] == expected
    assert run.token_ids == tokens
    for step, act in seen:
        assert torch.equal(act, fresh_pause(client, LAYER, step))


def test_compound_condition_pauses_at_the_first_matching_step(setup):
    client, _, tokens, logits = setup
    lp = logits.log_softmax(-1)
    entropy = (-(lp.exp() * lp).sum(-1)).tolist()
    ranked = sorted(entropy)
    e = (ranked[N // 2 - 1] + ranked[N // 2]) / 2
    first = next(s for s in range(N) if entropy[s] > e and s >= 3)
    run = client.generate(PROMPT, max_new_tokens=N,
                          breakpoints=[{"layer": LAYER, "step": "all", "site": "mlp_out",
                                        "when": f"(entropy > {e!r} and step >= 3) or not step >= 0"}])
    assert run.paused and run.step == first and run.site == "mlp_out"
    assert torch.equal(run.activation(), fresh_pause(client, LAYER, first, "mlp_out"))
    assert run.breakpoints[0]["when"] == {"or": [{"and": [{"term": "entropy", "op": ">", "value": e},
                                                           {"term": "step", "op": ">=", "value": 3}]},
                                                 {"not": {"term": "step", "op": ">=", "value": 0}}]}
    assert run.run_to_end().token_ids == tokens


def test_token_and_norm_terms(setup):
    client, _, tokens, _ = setup
    target = tokens[4]
    first = tokens.index(target)
    run = client.generate(PROMPT, max_new_tokens=N,
                          breakpoints=[{"layer": LAYER, "step": "all", "when": f"token in [{target}, -1]"}])
    assert run.paused and run.step == first
    run.close()
    # norm: the largest per-position L2 norm at the site; a threshold below every step's value fires at step 0
    act = fresh_pause(client, LAYER, 2)
    norm = act[0].norm(dim=-1).max().item()
    run = client.generate(PROMPT, max_new_tokens=N,
                          breakpoints=[{"layer": LAYER, "step": "all", "when": f"norm <= {norm!r} and step >= 2"}])
    assert run.paused and run.step == 2 and torch.equal(run.activation(), act)
    run.close()


@pytest.mark.parametrize("when", ["__import__('os')", "open('x')", "top1_prob < 0.3 and", "foo > 1",
                                  "entropy > 'x'", "step < 1; import os", "top1_prob.__class__ > 0", ""])
def test_conditions_that_are_not_conditions_are_refused(setup, when):
    client = setup[0]
    count = len(client.runs())
    with pytest.raises(DjinnError):
        client.generate(PROMPT, max_new_tokens=N, breakpoints=[{"layer": LAYER, "step": "all", "when": when}])
    assert len(client.runs()) == count


def test_the_server_validates_a_tree_it_is_sent(setup):
    client = setup[0]
    from djinn_nb.wire.messages import GenerateRequest
    from djinn_nb import wire

    for tree in ({"term": "os.system", "op": "<", "value": 1}, {"call": "eval"}, {"term": "step", "op": "in", "value": 1},
                 {"and": [{"term": "step", "op": "<", "value": 1}]}, {"term": "step", "op": "<", "value": "1"}):
        req = GenerateRequest(prompt=PROMPT, max_new_tokens=N,
                              breakpoints=[{"layer": LAYER, "step": "all", "when": tree}])
        with pytest.raises(BreakpointError):
            client._call("generate", wire.dumps(req.to_json()))


def test_unknown_term_is_named(setup):
    with pytest.raises(BreakpointError, match="unknown term 'perplexity'"):
        setup[0].generate(PROMPT, max_new_tokens=N, breakpoints=[{"layer": 0, "step": "all", "when": "perplexity > 3"}])


@pytest.mark.parametrize("finished", [True, False])
@pytest.mark.parametrize("k", [0, 4])
def test_rewind_equals_a_fresh_pause_and_resumes_to_the_plain_tokens(setup, finished, k):
    client, _, tokens, _ = setup
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER + 1, 6)])
    if finished:
        run.run_to_end()
    back = run.rewind(k, layer=LAYER)
    assert back.paused and (back.layer, back.site, back.step) == (LAYER, "resid_post", k)
    assert back.token_ids == tokens[:k]
    assert torch.equal(back.activation(), fresh_pause(client, LAYER, k))
    assert back.run_to_end().token_ids == tokens
    if not finished:  # the source is untouched
        assert run.refresh().paused and run.step == 6 and run.run_to_end().token_ids == tokens
    # the default layer and site: where the run last paused
    again = run.rewind(k)
    assert (again.layer, again.step) == (LAYER + 1, k)
    assert torch.equal(again.activation(), fresh_pause(client, LAYER + 1, k))
    for r in (run, back, again):
        r.close()


def test_rewind_refusals(setup):
    client = setup[0]
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, 3)])
    with pytest.raises(BreakpointError, match=r"reached steps 0\.\.3, not 5"):
        run.rewind(5)
    never = client.generate(PROMPT, max_new_tokens=3)
    with pytest.raises(BreakpointError, match="never paused"):
        never.rewind(1)
    never.close()
    with pytest.raises(UnknownRunError):
        never.rewind(1, layer=0)
    run.close()


@pytest.mark.parametrize("paused", [False, True])
def test_rewind_with_a_layer_alone_goes_to_its_output_even_on_a_run_that_never_paused(setup, paused):
    client, _, tokens, _ = setup
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, 5, "mlp_out")] if paused else None)
    back = run.rewind(4, layer=LAYER + 1)
    assert (back.layer, back.step, back.site, back.paused) == (LAYER + 1, 4, "resid_post", True)
    assert torch.equal(back.activation(), fresh_pause(client, LAYER + 1, 4))
    assert back.run_to_end().token_ids == tokens
    for r in (run, back):
        r.close()


def test_next_layer_and_next_step_land_where_a_fresh_breakpoint_would(setup):
    client, _, tokens, _ = setup
    last = client.info["num_layers"] - 1
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, 2, "z"), (LAYER + 1, 2, "mlp_out"), (0, 7)])
    assert run.next_layer() is run
    assert (run.layer, run.site, run.step) == (LAYER + 1, "resid_post", 2)  # skips (LAYER+1, mlp_out)
    assert torch.equal(run.activation(), fresh_pause(client, LAYER + 1, 2))
    run.next_step()
    assert (run.layer, run.site, run.step) == (LAYER + 1, "resid_post", 3)
    assert torch.equal(run.activation(), fresh_pause(client, LAYER + 1, 3))
    run.resume()  # the run's own breakpoints apply again
    assert (run.layer, run.step) == (0, 7)
    run.next_step()
    run.next_step()
    assert (run.layer, run.step) == (0, 9)
    run.next_step()  # no step 10: the run ends
    assert run.done and run.token_ids == tokens
    at_last = client.generate(PROMPT, max_new_tokens=N, breakpoints=[last])
    with pytest.raises(BreakpointError, match="last layer"):
        at_last.next_layer()
    assert at_last.refresh().paused
    at_last.close()


def test_history_matches_the_reference_tokens_topk_and_entropy(setup):
    client, _, tokens, logits = setup
    run = client.generate(PROMPT, max_new_tokens=N)
    hist = run.history()
    lp = logits.log_softmax(-1)
    assert [h["token_id"] for h in hist] == tokens and [h["step"] for h in hist] == list(range(N))
    for h, row in zip(hist, lp):
        ref = torch.topk(row, len(h["topk"]))
        assert [t for t, _ in h["topk"]] == ref.indices.tolist()
        assert h["topk"][0][0] == h["token_id"]
        assert [p for _, p in h["topk"]] == pytest.approx(ref.values.exp().tolist(), abs=1e-6)
        assert h["entropy"] == pytest.approx(-(row.exp() * row).sum().item(), abs=1e-4)
        assert "token" not in h  # this model has no tokenizer


def test_history_times_each_token_and_a_fork_times_only_its_own(setup):
    client = setup[0]
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(1, 2)])
    t0 = time.perf_counter()
    time.sleep(0.3)  # the client holds the run paused in step 2: that step's interval includes it
    fork = run.fork(breakpoints=[])
    run.run_to_end()
    waited = time.perf_counter() - t0
    times = [h["time_s"] for h in run.history()]
    assert times[0] == 0.0 and all(b > a for a, b in zip(times, times[1:]))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[1] >= 0.3 and gaps[1] <= waited + 0.01 and max(gaps[:1] + gaps[2:]) < 0.3
    own = [h["time_s"] for h in fork.history()]
    assert own[:2] == [None, None] and own[2] == 0.0 and len(own) == N


def test_finished_runs_keep_their_cache_and_it_counts(setup):
    client = setup[0]
    run = client.generate(PROMPT, max_new_tokens=N)
    assert run.done and run.bytes_held > 0
    run.close()


def test_the_paused_bytes_budget_offloads_finished_runs_and_rewind_brings_them_back(saved_models):
    from djinn_nb.core.engine import Engine

    model = hf_model(saved_models["gpt2-tiny"])
    engine = Engine(model, None, "tiny")
    done = engine.generate(PROMPT, N, breakpoints=[(LAYER, 5)])
    engine.resume(done.id)
    assert done.done and engine.resident_paused_bytes() == done.bytes_held() > 0
    assert engine.enforce_budget(0) == [done.id]
    assert done.offloaded and engine.resident_paused_bytes() == 0
    back = engine.rewind(done.id, 3)
    fresh = engine.generate(PROMPT, N, breakpoints=[(LAYER, 3)])
    assert not done.offloaded and torch.equal(back.checkpoint.hidden, fresh.checkpoint.hidden)
    while back.paused:
        engine.resume(back.id)
    assert back.token_ids == done.token_ids == generate(model, PROMPT, N)
