"""A paused and resumed run gives exactly the tokens of plain HF generate (+ the same hook edits)."""
from __future__ import annotations

import pytest
import torch

import djinn_nb
from djinn_nb.core.reference import generate, hf_model

PROMPT = [5, 17, 42, 99, 3, 250, 11, 7]
N = 12


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def setup(request, saved_models):
    path = saved_models[request.param]
    return djinn_nb.connect(model=path, device="cpu"), hf_model(path)


def resume_all(run):
    layers = []
    while run.paused:
        layers.append((run.layer, run.step))
        run.resume()
    return layers


def test_breakpoints_resumed_unmodified_match_generate(setup):
    client, model = setup
    ref = generate(model, PROMPT, N)
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[3, 6, 9])
    assert run.paused and (run.layer, run.step) == (3, 0)
    assert resume_all(run) == [(3, 0), (6, 0), (9, 0)]
    assert run.done and run.token_ids == ref and len(ref) == N


def test_unpaused_run_matches_generate(setup):
    client, model = setup
    run = client.generate(PROMPT, max_new_tokens=N)
    assert run.done and run.token_ids == generate(model, PROMPT, N)


def test_scale_at_layer6_matches_forward_hook(setup):
    client, model = setup
    ref = generate(model, PROMPT, N, edit_layer=6, edit=lambda h: h * 0.9)
    assert ref != generate(model, PROMPT, N), "the edit must change the output for this test to mean anything"
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[6])
    assert run.activation().shape == (1, len(PROMPT), client.info["hidden_size"])
    assert run.resume(scale=0.9).token_ids == ref


def test_replaced_activation_matches_forward_hook(setup):
    client, model = setup
    ref = generate(model, PROMPT, N, edit_layer=6, edit=lambda h: h * 0.9)
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[6])
    h = run.activation()
    assert run.resume(activation=h * 0.9).token_ids == ref


def test_add_vector_matches_forward_hook(setup):
    client, model = setup
    v = torch.linspace(-1, 1, client.info["hidden_size"])
    ref = generate(model, PROMPT, N, edit_layer=4, edit=lambda h: h + v)
    assert ref != generate(model, PROMPT, N)
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[4])
    assert run.resume(add=v).token_ids == ref


def test_two_forks_then_original_resumes_unmodified(setup):
    client, model = setup
    steered = generate(model, PROMPT, N, edit_layer=6, edit=lambda h: h * 0.9)
    plain = generate(model, PROMPT, N)
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[6])
    forks = [run.fork(scale=0.9), run.fork(scale=0.9)]
    assert [f.token_ids for f in forks] == [steered, steered]
    assert all(f.parent == run.id for f in forks)
    assert run.paused and (run.layer, run.step) == (6, 0)
    assert run.resume().token_ids == plain


def test_fork_keeps_later_breakpoints_unless_told(setup):
    client, model = setup
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[3, 9])
    child = run.fork()
    assert child.paused and (child.layer, child.step) == (9, 0)
    assert child.resume().token_ids == generate(model, PROMPT, N)
    assert run.fork(breakpoints=[]).done


def test_decoding_step_breakpoint_sees_one_position(setup):
    client, model = setup
    ref = generate(model, PROMPT, N, edit_layer=6, edit_call=3, edit=lambda h: -h)
    assert ref != generate(model, PROMPT, N)
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(6, 3)])
    assert (run.layer, run.step) == (6, 3) and len(run.token_ids) == 3
    assert run.activation().shape == (1, 1, client.info["hidden_size"])
    assert run.resume(scale=-1.0).token_ids == ref


def test_breakpoint_on_every_step(setup):
    client, model = setup
    run = client.generate(PROMPT, max_new_tokens=5, breakpoints=[(2, "all")])
    assert resume_all(run) == [(2, s) for s in range(5)]
    assert run.token_ids == generate(model, PROMPT, 5)


def test_edit_then_fork_and_reset(setup):
    client, model = setup
    steered = generate(model, PROMPT, N, edit_layer=6, edit=lambda h: h * 0.9)
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[6])
    original = run.activation()
    run.edit(scale=0.9)
    assert run.activation_stats["edited"]
    assert torch.equal(run.activation(), original * 0.9)
    assert torch.equal(run.activation(original=True), original)
    assert run.fork().token_ids == steered
    assert run.fork(original=True).token_ids == generate(model, PROMPT, N)
    assert run.fork(original=True, scale=0.9).token_ids == steered
    run.reset()
    assert run.resume().token_ids == generate(model, PROMPT, N)


@pytest.mark.parametrize("shape", ["neox-tiny", "qwen2-tiny"])
def test_other_architectures(saved_models, shape):
    path = saved_models[shape]
    model = hf_model(path)
    client = djinn_nb.connect(model=path)
    run = client.generate(PROMPT, max_new_tokens=6, breakpoints=[1, 3, (4, 2)])
    resume_all(run)
    assert run.token_ids == generate(model, PROMPT, 6)
    steered = generate(model, PROMPT, N, edit_layer=3, edit=lambda h: h * 0.3)
    assert steered != generate(model, PROMPT, N)
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[3])
    assert run.resume(scale=0.3).token_ids == steered


def test_seeded_sampling_is_reproducible_and_forks_share_the_generator(saved_models):
    client = djinn_nb.connect(model=saved_models["llama-tiny"])
    a = client.generate(PROMPT, max_new_tokens=N, temperature=1.0, seed=3)
    b = client.generate(PROMPT, max_new_tokens=N, temperature=1.0, seed=3, breakpoints=[5])
    fork = b.fork()
    assert fork.token_ids == a.token_ids
    assert b.resume().token_ids == a.token_ids
    assert client.generate(PROMPT, max_new_tokens=N, temperature=1.0, seed=4).token_ids != a.token_ids
