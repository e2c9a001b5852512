"""Patching one paused run into another on the server, and batched forks, each against plain HF
plus a torch hook doing the same thing (CPU, fp32, random GPT-2 and Llama)."""
from __future__ import annotations

import pytest
import torch

import djinn_nb
from djinn_nb.core.pause import Trace
from djinn_nb.core.reference import generate, hf_model
from djinn_nb.errors import ActivationError, BadRequestError, RunStateError, UnknownRunError

CLEAN = [5, 17, 42, 99, 3, 250, 11, 7]
CORRUPT = [5, 17, 42, 31, 60, 250, 11, 7]  # positions 3 and 4 differ
N = 6
LAYER = 1
BLOCKS = {"gpt2-tiny": "transformer.h", "llama-tiny": "model.layers"}


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def setup(request, saved_models):
    path = saved_models[request.param]
    return request.param, djinn_nb.connect(model=path, device="cpu"), hf_model(path)


def block(shape, model, layer):
    return model.get_submodule(BLOCKS[shape])[layer]


def block_output(shape, model, prompt, layer) -> torch.Tensor:
    """Block ``layer``'s output on the prompt pass, from a hook on the plain HF model."""
    with Trace(block(shape, model, layer)) as t, torch.no_grad():
        model(torch.tensor([prompt]))
    return t.value.clone()


def patched_reference(shape, model, target, layer, source_value, positions):
    """Greedy tokens of ``target`` with block ``layer``'s prompt-pass output overwritten from ``source_value``."""
    def write(h):
        if h.shape[1] == 1 and len(target) > 1:  # decoding steps pass through
            return h
        h = h.clone()
        idx = list(range(h.shape[1])) if positions is None else positions
        h[:, idx] = source_value[:, idx]
        return h

    with Trace(block(shape, model, layer), edit=write):
        return generate(model, target, N)


@pytest.mark.parametrize("positions", [[3], [3, 4], None])
def test_fork_patch_from_equals_a_hook_writing_the_other_runs_block_output(setup, positions):
    shape, client, model = setup
    a = client.generate(CLEAN, max_new_tokens=N, breakpoints=[LAYER])
    b = client.generate(CORRUPT, max_new_tokens=N, breakpoints=[LAYER])
    forked = b.fork(patch_from=a, positions=positions, breakpoints=[])
    src = block_output(shape, model, CLEAN, LAYER)
    assert torch.equal(a.activation(), src)
    assert forked.token_ids == patched_reference(shape, model, CORRUPT, LAYER, src, positions)
    # both sources stay paused where they were and resume to their own tokens
    assert a.refresh().paused and b.refresh().paused
    assert a.resume().token_ids == generate(model, CLEAN, N)
    assert b.resume().token_ids == generate(model, CORRUPT, N)


def test_edit_patch_from_every_position_gives_the_clean_next_token(setup):
    """Later steps still attend to the corrupt prompt's keys below the patched layer; the first
    token depends only on the blocks after it, so it is the clean run's."""
    shape, client, model = setup
    a = client.generate(CLEAN, max_new_tokens=N, breakpoints=[LAYER])
    b = client.generate(CORRUPT, max_new_tokens=N, breakpoints=[LAYER])
    b.edit(patch_from=a.id)
    assert torch.equal(b.activation(), a.activation())
    tokens = b.resume().token_ids
    assert tokens[0] == generate(model, CLEAN, 1)[0]
    assert tokens == patched_reference(shape, model, CORRUPT, LAYER, block_output(shape, model, CLEAN, LAYER), None)
    a.close()


def test_resume_patch_from_at_an_inner_site(setup):
    shape, client, model = setup
    a = client.generate(CLEAN, max_new_tokens=N, breakpoints=[(LAYER, 0, "mlp_out")])
    b = client.generate(CORRUPT, max_new_tokens=N, breakpoints=[(LAYER, 0, "mlp_out")])
    expect_mlp = a.activation()
    mlp = block(shape, model, LAYER).mlp

    def write(h):
        if h.shape[1] == 1:
            return h
        h = h.clone()
        h[:, [3]] = expect_mlp[:, [3]]
        return h

    with Trace(mlp, edit=write):
        want = generate(model, CORRUPT, N)
    assert b.resume(patch_from=a, positions=[3]).token_ids == want
    a.close()


def test_mismatched_patches_are_refused_and_leave_both_runs_untouched(setup):
    _, client, _ = setup
    a = client.generate(CLEAN, max_new_tokens=N, breakpoints=[LAYER, (LAYER, 2)])
    b = client.generate(CORRUPT, max_new_tokens=N, breakpoints=[LAYER + 1])
    short = client.generate(CLEAN[:5], max_new_tokens=N, breakpoints=[LAYER])
    before_a, before_b = a.activation(), b.activation()
    with pytest.raises(ActivationError, match="same layer, step and site"):
        b.fork(patch_from=a, breakpoints=[])
    with pytest.raises(ActivationError, match="5 positions, this run 8"):
        a.fork(patch_from=short, breakpoints=[])
    with pytest.raises(ActivationError, match=r"positions must be distinct integers in 0\.\.4"):
        a.fork(patch_from=short, positions=[6], breakpoints=[])
    with pytest.raises(ActivationError, match="either activation= or patch_from="):
        a.fork(patch_from=short, activation=before_a, breakpoints=[])
    with pytest.raises(ActivationError, match="pass patch_from too"):
        a.fork(positions=[1], breakpoints=[])
    with pytest.raises(UnknownRunError):
        a.fork(patch_from="r999-deadbeef", breakpoints=[])
    # a paused run at another step (a decoding step) has a different shape and step
    a2 = a.fork(breakpoints=[(LAYER, 2)])
    with pytest.raises(ActivationError, match="step 2"):
        a2.fork(patch_from=a, breakpoints=[])
    assert torch.equal(a.refresh().activation(), before_a) and a.paused
    assert torch.equal(b.refresh().activation(), before_b) and b.paused
    # positions present in both runs of different lengths are fine
    ok = a.fork(patch_from=short, positions=[0, 4], breakpoints=[])
    assert ok.done
    done = ok
    with pytest.raises(RunStateError, match="not paused"):
        a.fork(patch_from=done, breakpoints=[])
    for r in (a, b, short, a2):
        r.close()


SCALES = [0.0, 0.25, 0.5, 0.9, 1.0, 1.1, 1.5, 2.0]


@pytest.mark.parametrize("step", [0, 2])
def test_fork_many_of_8_scales_equals_8_single_forks(setup, step):
    _, client, model = setup
    run = client.generate(CLEAN, max_new_tokens=N, breakpoints=[(LAYER, step)])
    before = run.activation()
    many = run.fork_many([{"scale": s, "breakpoints": []} for s in SCALES])
    singles = [run.fork(scale=s, breakpoints=[]) for s in SCALES]
    assert [m.token_ids for m in many] == [s.token_ids for s in singles]
    assert all(m.done and m.parent == run.id for m in many)
    # each batched fork counts its own rows of the batch's KV cache, as much as a single fork holds
    assert [m.bytes_held for m in many] == [s.bytes_held for s in singles]
    assert many[0].summary["continued_by"] == "batch of 8"
    assert len({m.id for m in many}) == 8
    assert run.refresh().paused and torch.equal(run.activation(), before)
    assert run.resume().token_ids == generate(model, CLEAN, N)


def test_fork_many_with_mixed_lengths_breakpoints_and_patches(setup):
    _, client, model = setup
    a = client.generate(CLEAN, max_new_tokens=N, breakpoints=[LAYER])
    b = client.generate(CORRUPT, max_new_tokens=N, breakpoints=[LAYER])
    edits = [
        {"scale": 0.5, "breakpoints": [], "max_new_tokens": 2},
        {"patch_from": a, "positions": [3], "breakpoints": []},
        {"scale": 1.5, "breakpoints": [(LAYER + 1, 3)]},  # leaves the batch at step 3 and pauses there
        {"add": [0.1] * client.info["hidden_size"], "breakpoints": []},
        {"breakpoints": [(LAYER + 1, 0, "mlp_out")]},  # pauses later in the same step: runs alone
    ]
    many = b.fork_many(edits)
    single = [b.fork(**kw) for kw in edits]
    for m, s in zip(many, single):
        assert (m.state, m.token_ids, m.layer, m.site, m.step) == (s.state, s.token_ids, s.layer, s.site, s.step)
    assert len(many[0].token_ids) == 2
    # a batched matmul need not equal the single one in the last bits (README: exactness of fork_many)
    assert many[2].paused and many[2].step == 3
    torch.testing.assert_close(many[2].activation(), single[2].activation(), rtol=1e-5, atol=1e-5)
    assert many[2].resume().token_ids == single[2].resume().token_ids
    assert many[4].paused and many[4].site == "mlp_out"
    assert many[4].run_to_end().token_ids == generate(model, CORRUPT, N)
    # the short fork's rows are read only now, after the batch went on without it for four steps
    assert many[0].bytes_held == single[0].bytes_held
    back, back_single = many[0].rewind(step=1), single[0].rewind(step=1)
    torch.testing.assert_close(back.activation(), back_single.activation(), rtol=1e-5, atol=1e-5)
    assert back.run_to_end().token_ids == back_single.run_to_end().token_ids == many[0].token_ids


def test_fork_many_validates_everything_before_starting_any(setup):
    _, client, _ = setup
    run = client.generate(CLEAN, max_new_tokens=N, breakpoints=[LAYER])
    count = len(client.runs())
    with pytest.raises(ActivationError, match="scale must be a finite number"):
        run.fork_many([{"scale": 0.5}, {"scale": float("nan")}])
    with pytest.raises(BadRequestError, match="unknown argument"):
        run.fork_many([{"scael": 0.5}])
    with pytest.raises(BadRequestError, match="non-empty list"):
        run.fork_many([])
    with pytest.raises(BadRequestError, match="max_new_tokens"):
        run.fork_many([{"max_new_tokens": 0}])
    assert len(client.runs()) == count and run.refresh().paused


def test_token_probs_match_the_softmax_of_each_runs_logits(setup):
    _, client, _ = setup
    run = client.generate(CLEAN, max_new_tokens=N, breakpoints=[LAYER])
    forks = run.fork_many([{"scale": s, "breakpoints": [], "max_new_tokens": 1} for s in (0.5, 1.0)])
    probs = client.token_probs(forks, 7)
    for f, p in zip(forks, probs):
        assert p == pytest.approx(torch.softmax(f.logits(), -1)[7].item(), rel=1e-6)
    with pytest.raises(BadRequestError, match="token must be an id"):
        client.token_probs(forks, -1)
    with pytest.raises(RunStateError, match="finished no step"):
        client.token_probs([run], 7)


def test_fork_many_refuses_an_overflowing_edit_before_starting_any(setup):
    _, client, _ = setup
    run = client.generate(CLEAN, max_new_tokens=N, breakpoints=[LAYER])
    count = len(client.runs())
    with pytest.raises(ActivationError, match="fork 1: the edit makes the activation non-finite"):
        run.fork_many([{"scale": 2.0}, {"scale": 3e38, "add": [3e38] * client.info["hidden_size"]}])
    assert len(client.runs()) == count and run.refresh().paused
    run.close()
