"""``graphs.TailGraph``: the layers after a checkpoint captured once as a CUDA graph, replayed
for new activations. A replay must equal the eager run of the same layers bit for bit (logits and
every KV entry it writes), must actually read the activation it is given, and must leave the
cache it was captured from untouched."""
from __future__ import annotations

import pytest
import torch

from djinn_nb.core import graphs, kvcache
from djinn_nb.core.architecture import find_anatomy, run_tail
from djinn_nb.core.models import build_random
from djinn_nb.core.pause import Trace, output_hidden

START = 6  # capture after block 5: blocks 6.. and the head are the tail


@pytest.fixture(scope="module")
def checkpoint():
    from transformers import DynamicCache

    model = build_random("gpt2-tiny", "cuda:0", torch.float32, seed=3)
    anatomy = find_anatomy(model)
    cache = DynamicCache(config=model.config)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode(), Trace(anatomy.blocks[START - 1], stop=True, keep_inputs=True) as t:
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    assert t.stopped
    base = kvcache.fork_cache(cache)

    def tail(hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        h = hidden
        for block in anatomy.blocks[START:]:
            h = output_hidden(block(h, *args, **kwargs))
        return run_tail(anatomy, h)

    return tail, t.value, t.args, t.kwargs, cache, base


def _eager(checkpoint, hidden):
    tail, _h, args, kwargs, cache, base = checkpoint
    fresh = kvcache.fork_cache(base)
    with torch.inference_mode():
        logits = tail(hidden, graphs._swap(args, cache, fresh), graphs._swap(kwargs, cache, fresh))
    return logits, fresh


def test_replay_equals_eager_bit_for_bit_for_new_activations(checkpoint):
    tail, hidden, args, kwargs, cache, base = checkpoint
    before = [t.clone() for layer in base.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    with torch.inference_mode():
        graph = graphs.TailGraph(tail, START, hidden, args, kwargs, cache, base)
        outs = []
        for factor in (1.0, 0.5, 1.7):
            edited = hidden * factor
            replayed = graph.replay(edited).clone()
            logits, eager_cache = _eager(checkpoint, edited)
            assert graph.matches(logits, eager_cache), factor
            assert torch.equal(replayed, logits)
            outs.append(replayed)
    assert not torch.equal(outs[0], outs[1]), "the replay must read the activation it is given"
    after = [t for layer in base.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "capture and replay wrote into the checkpoint's cache"


def test_copy_cache_into_gives_a_fork_its_own_entries(checkpoint):
    tail, hidden, args, kwargs, cache, base = checkpoint
    with torch.inference_mode():
        graph = graphs.TailGraph(tail, START, hidden, args, kwargs, cache, base)
        graph.replay(hidden * 0.8)
        mine = kvcache.fork_cache(base)
        graph.copy_cache_into(mine)
        _, eager_cache = _eager(checkpoint, hidden * 0.8)
        graph.replay(hidden * 1.3)  # a later replay must not change what the fork holds
    for i in graph.written_layers():
        assert torch.equal(mine.layers[i].keys, eager_cache.layers[i].keys)
        assert torch.equal(mine.layers[i].values, eager_cache.layers[i].values)
