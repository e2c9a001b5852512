"""Batched forks (``fork_many``) replay the layers after their checkpoint as a CUDA graph from the
second batch of one size on; every replay must equal the eager batch bit for bit."""
from __future__ import annotations

import pytest
import torch

from djinn_nb.core.engine import Engine, ForkSpec
from djinn_nb.core.models import build_random
from djinn_nb.core.specs import Edit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SCALES = [0.5, 1.0, 1.5, 2.0]


@pytest.fixture(scope="module")
def engine():
    return Engine(build_random("gpt2-tiny", "cuda:0", torch.float32, seed=3), None, "tiny")


def three_batches(engine, parent, limit):
    out = []
    for _ in range(3):
        forks = engine.fork_many(parent.id, [ForkSpec(Edit(scale=s), [], limit) for s in SCALES])
        out.append([(f.token_ids, f.last_logits.clone(), f.continued_by) for f in forks])
        for f in forks:
            engine.close(f.id)
    return out


@pytest.mark.parametrize("site", ["resid_post", "mlp_out"])
def test_fork_many_replays_equal_the_eager_batch_bit_for_bit(engine, site):
    parent = engine.generate(list(range(3, 27)), 6, breakpoints=[(1, 0, site)])
    first = three_batches(engine, parent, 1)  # logits of the paused step itself
    assert [c[2] for c in first[0]] == ["batch of 4"] * 4
    assert [c[2] for c in first[1]] == ["batch of 4, graph captured"] * 4
    assert [c[2] for c in first[2]] == ["batch of 4, cuda-graph"] * 4
    for eager, replayed in zip(first[0], first[2]):
        assert torch.equal(eager[1], replayed[1])
    later = three_batches(engine, parent, None)  # and the steps after it, from the replayed cache
    assert [c[0] for c in later[2]] == [c[0] for c in later[0]]
    assert parent.paused and parent.checkpoint.graphs.batched_disabled == {}
