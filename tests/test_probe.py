"""The load-time exactness probe: cheap on exact models, and still catching what it must.

The probe checks every site with one chained split forward per step (see
``architecture.check_split_is_exact``); these tests break a model on purpose and
check that the probe names the sites that break, refuses a model whose block
output or head cannot be replayed, and still proves small models site by site.
"""
from __future__ import annotations

import functools

import pytest
import torch

from djinn_nb.core.architecture import CHAIN_ORDER, probe_chains
from djinn_nb.core.engine import Engine
from djinn_nb.core.models import build_random
from djinn_nb.core.sites import SITES
from djinn_nb.errors import BreakpointError, UnsupportedModelError


def _shift_block_outputs(model: torch.nn.Module, blocks: torch.nn.ModuleList) -> None:
    """Each block returns its output + 0.25: its own forward no longer ends in resid_mid + mlp_out,
    so finishing by hand from a site inside the block differs, while resid_pre/resid_post stay exact."""
    for block in blocks:
        forward = block.forward

        def shifted(*args, _forward=forward, **kwargs):
            out = _forward(*args, **kwargs)
            return out + 0.25 if isinstance(out, torch.Tensor) else (out[0] + 0.25, *out[1:])

        block.forward = shifted


def test_chains_visit_every_site_once_per_step_at_distinct_increasing_layers():
    for layers in (6, 12, 30, 80):
        chains = probe_chains(layers, SITES)
        assert len(chains) == 2
        for chain in chains:
            assert sorted(s for _, s in chain) == sorted(SITES)
            ls = [l for l, _ in chain]
            assert ls == sorted(set(ls)) and ls[0] == 0 and ls[-1] == layers - 1
        # the decoding step pauses first (in the model's own forward) at another site
        assert chains[0][0][1] == "resid_post" and chains[1][0][1] == "z"
    assert probe_chains(5, SITES) is None
    assert probe_chains(3, ("resid_pre", "resid_post")) == [[(0, "resid_post"), (2, "resid_pre")],
                                                            [(0, "resid_pre"), (2, "resid_post")]]
    assert [s for _, s in probe_chains(40, ("resid_post", "mlp_out", "z"))[0]] == [
        s for s in CHAIN_ORDER if s in ("resid_post", "mlp_out", "z")]


@pytest.mark.parametrize("shape", ["llama-tiny", "gpt2-tiny"])
def test_exact_models_pass_with_every_site_and_four_forwards(shape):
    model = build_random(shape, seed=3)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    threads = torch.get_num_threads()
    engine = Engine(model)
    assert engine.inexact_sites == {}
    assert engine.info()["sites"] == list(SITES)
    assert len(calls) == 4  # 2 reference steps + 1 chained split forward per step
    assert torch.get_num_threads() == threads  # the probe's fewer threads are given back


def test_inner_sites_that_do_not_finish_exactly_are_named_and_refused():
    model = build_random("llama-tiny", seed=3)
    _shift_block_outputs(model, model.model.layers)
    engine = Engine(model)
    assert sorted(engine.inexact_sites) == sorted(["z", "attn_out", "resid_mid", "mlp_out"])
    assert "does not reproduce the model's own forward" in engine.inexact_sites["mlp_out"]
    assert engine.info()["sites"] == ["resid_pre", "resid_post"]
    with pytest.raises(BreakpointError, match="mlp_out"):
        engine.generate([1, 2, 3], 2, [{"layer": 3, "step": 0, "site": "mlp_out"}])
    # the exact sites still pause and resume to the model's own tokens
    plain = engine.generate([1, 2, 3], 4, [])
    run = engine.generate([1, 2, 3], 4, [{"layer": 3, "step": "all", "site": "resid_pre"}])
    while run.state.value == "paused":
        run = engine.resume(run.id)
    assert run.token_ids == plain.token_ids


def test_a_head_the_split_does_not_replay_is_refused_at_load():
    model = build_random("llama-tiny", seed=3)
    own_forward = model.forward

    @functools.wraps(own_forward)
    def soft_capped(*args, **kwargs):  # logit soft-capping in the model's forward, not in its head module
        out = own_forward(*args, **kwargs)
        out.logits = torch.tanh(out.logits / 3.0) * 3.0
        return out

    model.forward = soft_capped
    with pytest.raises(UnsupportedModelError, match=r"from resid_post of block \d+ does not reproduce"):
        Engine(model)


def test_a_model_with_fewer_blocks_than_sites_is_probed_site_by_site():
    from djinn_nb.core.models import random_config
    from transformers import AutoModelForCausalLM

    config = random_config("llama-tiny")
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert Engine(model).inexact_sites == {}
    _shift_block_outputs(model, model.model.layers)
    assert sorted(Engine(model).inexact_sites) == sorted(["z", "attn_out", "resid_mid", "mlp_out"])
