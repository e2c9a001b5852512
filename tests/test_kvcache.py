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


def test_a_cache_mark_puts_back_append_only_and_in_place_layers_exactly():
    """One way back for the NaN guard and the conditional replay (kvcache.CacheMark): append-only
    layers keep their tensors (nothing copied), a layer that writes in place is kept as a deep copy."""
    from types import SimpleNamespace

    from transformers.cache_utils import DynamicLayer

    from djinn_nb.core.kvcache import CacheMark

    class InPlace:
        def __init__(self):
            self.keys = torch.zeros(1, 1, 3, 2)

    grown = DynamicLayer()
    grown.keys, grown.values, grown.is_initialized = torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2), True
    odd = InPlace()
    cache = SimpleNamespace(layers=[grown, odd])
    kept_keys = grown.keys
    mark = CacheMark(cache)
    grown.keys = torch.cat([grown.keys, torch.full((1, 1, 1, 2), 5.0)], -2)  # an update rebinds
    odd.keys[0, 0, 0, 0] = 9.0  # an in-place write
    cache.layers.append(InPlace())  # and a layer the failed call added
    mark.restore(cache)
    assert len(cache.layers) == 2 and cache.layers[0] is grown and grown.keys is kept_keys
    assert float(cache.layers[1].keys.abs().sum()) == 0.0


def test_a_batch_rows_bytes_are_counted_without_making_its_views_and_equal_the_made_ones():
    """``Run.bytes_held``/``storages`` of a batched fork's lazy row (``kvcache.row_views``) equal
    what the same run counts once its row's views exist (``row_of``)."""
    from djinn_nb.core.engine import Engine
    from djinn_nb.core.forking import ForkSpec
    from djinn_nb.core.kvcache import row_of, row_views
    from djinn_nb.core.specs import Edit

    engine = Engine(build_random("gpt2-tiny", seed=2), None, "t")
    parent = engine.generate(list(range(5, 25)), max_new_tokens=3, breakpoints=[{"layer": 4, "step": 1}])
    forks = engine.fork_many(parent.id, [ForkSpec(Edit(scale=1 + i / 8), [], 3) for i in range(6)])
    assert all(f._row is not None for f in forks)  # finished in the batch: rows kept lazily
    lazy = [(f.bytes_held(), dict(f.storages())) for f in forks]
    assert all(f._row is not None for f in forks)  # counting made no views
    batch, row, rows = forks[2]._row
    made = row_of(batch, row, rows)
    views = row_views(batch, row, rows)
    tensors = [t for layer in made.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    assert [(int(t.storage_offset()), tuple(t.shape), tuple(t.stride())) for t in tensors] == [v[1:] for v in views]
    for f in forks:
        f.cache  # noqa: B018 - reading it makes the row's views
        f._bytes = None
    assert [(f.bytes_held(), dict(f.storages())) for f in forks] == lazy
    assert lazy[0][0] > 0 and len({b for b, _ in lazy}) == 1


def test_a_batch_rows_count_is_made_once_and_holds_with_other_tensors_beside_the_row():
    """The count of a batch's row is shared by its rows (``kvcache.row_count``, made once per
    snapshot); a fork that also holds its own tensors (recorded logits) counts them beside its
    lazy row, the same as once the row's views exist."""
    from djinn_nb.core import kvcache
    from djinn_nb.core.engine import Engine
    from djinn_nb.core.forking import ForkSpec
    from djinn_nb.core.specs import Edit

    engine = Engine(build_random("gpt2-tiny", seed=3), None, "t")
    for record in (False, True):
        parent = engine.generate(list(range(5, 25)), max_new_tokens=3, breakpoints=[{"layer": 4, "step": 1}],
                                 record_logits=record)
        forks = engine.fork_many(parent.id, [ForkSpec(Edit(scale=1 + i / 8), [], 3) for i in range(5)])
        snapshot, _, rows = forks[0]._row
        assert all(f._row[0] is snapshot for f in forks)
        lazy = [(f.bytes_held(), dict(f.storages())) for f in forks]
        assert snapshot in kvcache._ROW_COUNTS and kvcache._ROW_COUNTS[snapshot][0] == rows
        assert all(f._row is not None for f in forks)  # counting made no views
        assert all(bool(f.logits) == record for f in forks)
        for f in forks:
            f.cache  # noqa: B018 - reading it makes the row's views
            f._bytes = None
        assert [(f.bytes_held(), dict(f.storages())) for f in forks] == lazy
        if record:  # the recorded logits are counted too
            assert lazy[0][0] > kvcache.row_count(snapshot, rows)[0]
