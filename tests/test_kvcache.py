"""``core.kvcache``: a fork of a KV cache must be independent of its parent (a fork that writes
must not change what the parent holds, and the other way round) while sharing the tensors it
can (no device traffic for a fork); and a model continued from a forked cache must produce what
it produces from the original."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from djinn_nb.core.kvcache import fork_cache, map_cache_tensors
from djinn_nb.core.models import build_random


@pytest.fixture(scope="module")
def model():
    return build_random("gpt2-tiny", seed=5).eval()


def _prefill(model, ids: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True).logits
    return cache, logits


def _step(model, cache, tok: int) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1]


def _snapshot(cache) -> list[torch.Tensor]:
    return [t.clone() for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]


def test_fork_shares_tensors_until_either_side_writes(model):
    cache, _ = _prefill(model, [1, 2, 3, 4])
    fork = fork_cache(cache)
    assert fork is not cache and all(a is not b for a, b in zip(fork.layers, cache.layers))
    assert all(a.keys is b.keys and a.values is b.values for a, b in zip(fork.layers, cache.layers))
    before = _snapshot(cache)
    _step(model, fork, 7)
    assert fork.get_seq_length() == 5 and cache.get_seq_length() == 4
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(cache))), "the fork wrote into its parent"


def test_forks_continue_exactly_like_fresh_caches(model):
    """Two forks of one prefill, each fed a different token, give the logits of two fresh runs."""
    prompt = [11, 22, 33, 44, 55]
    cache, _ = _prefill(model, prompt)
    a, b = fork_cache(cache), fork_cache(cache)
    got_a, got_b = _step(model, a, 9), _step(model, b, 10)
    _, fresh_a = _prefill(model, prompt + [9])
    _, fresh_b = _prefill(model, prompt + [10])
    assert torch.allclose(got_a, fresh_a[0, -1], atol=1e-5) and torch.allclose(got_b, fresh_b[0, -1], atol=1e-5)
    assert not torch.equal(got_a, got_b)
    # and the parent, continued afterwards, is what it would have been without the forks
    c2, _ = _prefill(model, prompt)
    assert torch.equal(_step(model, cache, 9), _step(model, c2, 9))


def test_map_cache_tensors_replaces_every_tensor_in_a_fixed_order(model):
    cache, _ = _prefill(model, [3, 1, 4, 1, 5])
    seen: list[tuple[int, ...]] = []

    def fn(t: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(t.shape))
        return t * 0 + len(seen)

    map_cache_tensors(cache, fn)
    n_layers = len(cache.layers)
    assert len(seen) == 2 * n_layers  # keys and values of every layer, once each
    values = [int(t.flatten()[0]) for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    assert values == list(range(1, 2 * n_layers + 1))
    again: list[tuple[int, ...]] = []
    map_cache_tensors(cache, lambda t: again.append(tuple(t.shape)) or t)
    assert again == seen  # the order is stable: offload and restore rely on it
