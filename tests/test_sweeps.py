"""A sweep in one round trip: ``fork_many(..., probs_of=...)`` carries each fork's probabilities.

Reference: plain HF (the last step's distribution of the fork's own tokens, for the unedited
fork) and the server's own ``token_probs`` of the same forks kept open.
"""
from __future__ import annotations

import pytest
import torch

import djinn_nb
from djinn_nb.core.reference import hf_model
from djinn_nb.errors import BadRequestError
from experiments.harness.round_trips import count_requests

PROMPT = [5, 17, 42, 99, 3, 250, 11, 7]
SCALES = [0.0, 0.5, 1.0, 1.5, 2.0]
A, B = 9, 300


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def setup(request, saved_models):
    path = saved_models[request.param]
    client = djinn_nb.connect(model=path, device="cpu")
    yield client, hf_model(path)
    client.close()


def test_a_sweep_of_closed_forks_reads_each_forks_probabilities_in_one_request(setup):
    client, model = setup
    run = client.generate(PROMPT, max_new_tokens=3, breakpoints=[(2, 1)])
    before = {r["id"] for r in client.runs()}
    with count_requests(client) as sent:
        forks = run.fork_many([{"scale": s, "breakpoints": [], "close": True} for s in SCALES], probs_of=[A, B])
    assert sent.n == 1
    assert {r["id"] for r in client.runs()} == before  # closed on the server, nothing kept
    kept = run.fork_many([{"scale": s, "breakpoints": []} for s in SCALES])
    assert [f.probs_of for f in kept] == [{}] * len(SCALES)  # none asked for
    for token in (A, B):
        assert [f.probs_of[token] for f in forks] == client.token_probs(kept, token)
    unedited = forks[SCALES.index(1.0)]
    with torch.inference_mode():
        ids = torch.tensor([PROMPT + unedited.token_ids[:-1]])  # token_ids: the generated ones
        ref = model(ids).logits[0, -1].float().softmax(-1)
    assert unedited.probs_of[A] == pytest.approx(ref[A].item(), rel=1e-5, abs=1e-8)
    assert unedited.probs_of[B] == pytest.approx(ref[B].item(), rel=1e-5, abs=1e-8)
    assert len({round(f.probs_of[A], 12) for f in forks}) > 1  # the scales do change it
    for f in kept:
        f.close()
    run.close()


def test_per_fork_probs_of_and_bad_ones_refused_before_any_fork_exists(setup):
    client, model = setup
    run = client.generate(PROMPT, max_new_tokens=3, breakpoints=[(2, 1)])
    forks = run.fork_many([{"scale": 0.5, "breakpoints": [], "probs_of": A, "close": True},
                           {"scale": 2.0, "breakpoints": [], "close": True}])
    assert set(forks[0].probs_of) == {A} and forks[1].probs_of == {}
    before = {r["id"] for r in client.runs()}
    vocab = model.config.vocab_size
    for bad, message in ((vocab, "probs_of must be at most 64 token ids"), ([True], "probs_of must be a token id"),
                         ([], "probs_of must be a token id"), (list(range(65)), "at most 64"), ("9", "probs_of")):
        with pytest.raises(BadRequestError, match=message):
            run.fork_many([{"scale": 0.5, "breakpoints": []}], probs_of=bad)
    assert {r["id"] for r in client.runs()} == before
    assert run.refresh().paused
    run.close()
