"""Attribution patching (issue 23, item 3): the server's estimate against one computed here with
plain HF + hooks + autograd (a zero offset at each layer's site, differentiated), every cell, on
random GPT-2 and Llama; the model left exactly as it was; bad requests refused by name; the
estimate's top cells patched exactly through ``cells=``."""
from __future__ import annotations

import json

import pytest
import torch

import djinn_nb
from djinn_nb.client import connection
from djinn_nb.core.pause import Trace
from djinn_nb.core.reference import hf_model
from djinn_nb.errors import BadRequestError, QuotaError

CLEAN = [5, 17, 42, 99, 3, 250, 11, 7]
CORRUPT = [5, 17, 42, 31, 60, 250, 11, 7]
POINT = {  # site -> (module path in block l, pre)
    "gpt2-tiny": {"resid_pre": ("", True), "resid_post": ("", False), "z": ("attn.c_proj", True),
                  "attn_out": ("attn", False), "mlp_out": ("mlp", False)},
    "llama-tiny": {"resid_pre": ("", True), "resid_post": ("", False), "z": ("self_attn.o_proj", True),
                   "attn_out": ("self_attn", False), "mlp_out": ("mlp", False)},
}
BLOCKS = {"gpt2-tiny": "transformer.h", "llama-tiny": "model.layers"}


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def setup(request, saved_models):
    path = saved_models[request.param]
    client = djinn_nb.connect(model=path, device="cpu", embedded=True)  # the tests read the server's engine
    engine = connection._embedded[(path, "cpu", None)].state.engine
    return client, hf_model(path), request.param, engine


def module(model, name, layer, site):
    path, pre = POINT[name][site]
    return model.get_submodule(f"{BLOCKS[name]}.{layer}" + (f".{path}" if path else "")), pre


def reference(model, name, site, metric, answer=None, foil=None, positions=None, heads=None):
    """AtP written out independently: the clean values recorded by hooks; in the corrupted run a zero
    offset (a leaf that requires grad) added at each layer's site; autograd of the metric w.r.t. the
    offsets is the gradient at the site; each cell sums (clean - corrupted) * gradient."""
    layers = range(model.config.num_hidden_layers)
    points = [module(model, name, layer, site) for layer in layers]
    clean = {}
    with torch.no_grad():
        traces = [Trace(m, pre=pre).hook() for m, pre in points]
        try:
            clean_logits = model(torch.tensor([CLEAN])).logits[0, -1]
        finally:
            for t in traces:
                t.unhook()
        clean = [t.value.clone() for t in traces]
    offsets = [torch.zeros_like(c, requires_grad=True) for c in clean]
    corrupt = []

    def adder(offset):
        def edit(h):
            corrupt.append(h.detach().clone())
            return h + offset
        return edit

    traces = [Trace(m, pre=pre, edit=adder(o)).hook() for (m, pre), o in zip(points, offsets)]
    try:
        logits = model(torch.tensor([CORRUPT])).logits[0, -1]
    finally:
        for t in traces:
            t.unhook()
    answer = int(clean_logits.argmax()) if answer is None else answer
    if metric == "prob":
        value = torch.softmax(logits, -1)[answer]
    else:
        if foil is None:
            top = logits.topk(2).indices.tolist()
            foil = top[1] if top[0] == answer else top[0]
        value = logits[answer] - logits[foil]
    grads = torch.autograd.grad(value, offsets)
    positions = list(range(len(CLEAN))) if positions is None else positions
    rows = []
    for c, x, g in zip(clean, corrupt, grads):
        prod = ((c - x) * g)[0, positions]
        if site == "z":
            n = model.config.num_attention_heads
            per_head = prod.unflatten(-1, (n, -1)).sum(dim=(0, 2))
            rows.append(per_head[heads if heads is not None else list(range(n))].tolist())
        else:
            rows.append(prod.sum(-1).tolist())
    return torch.tensor(rows), answer, foil, float(value.detach())


def model_state(engine):
    params = dict(engine.model.named_parameters())
    return ({k: p.detach().clone() for k, p in params.items()}, {k: p.requires_grad for k, p in params.items()},
            [k for k, p in params.items() if p.grad is not None])


def assert_unchanged(engine, state):
    values, flags, grads = model_state(engine)
    assert flags == state[1] and grads == state[2] == []
    assert all(torch.equal(values[k], v) for k, v in state[0].items())


@pytest.mark.parametrize("metric", ["prob", "logit_diff"])
@pytest.mark.parametrize("site", ["resid_pre", "resid_post", "attn_out", "mlp_out", "z"])
def test_every_cell_equals_hooks_and_autograd_written_independently(setup, site, metric):
    client, model, name, engine = setup
    before = {r["id"] for r in client.runs()}
    state = model_state(engine)
    est = djinn_nb.attribution_patching(client, CLEAN, CORRUPT, site=site, metric=metric)
    want, answer, foil, corrupt_metric = reference(model, name, site, metric)
    got = torch.tensor(est.to_numpy(), dtype=torch.float32)
    assert got.shape == want.shape and est.attrs["answer"] == answer and est.attrs["foil"] == foil
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-8), (got - want).abs().max()
    assert want.abs().max() > 1e-5  # the cells carry an estimate, not zeros
    assert est.attrs["corrupt_metric"] == pytest.approx(corrupt_metric, rel=1e-5)
    assert est.attrs["metric"] == metric and est.attrs["site"] == site and est.attrs["estimate"] is True
    assert_unchanged(engine, state)
    assert {r["id"] for r in client.runs()} == before


def test_heads_at_one_position_and_a_chosen_answer_and_foil(setup):
    client, model, name, _ = setup
    est = djinn_nb.attribution_patching(client, CLEAN, CORRUPT, answer=9, site="z", heads=[2, 0], positions=[3],
                                        metric="logit_diff", foil=11, layers=[1, 4])
    want, *_ = reference(model, name, "z", "logit_diff", answer=9, foil=11, positions=[3], heads=[2, 0])
    assert list(est.index) == [1, 4] and list(est.columns) == [2, 0]
    assert torch.allclose(torch.tensor(est.to_numpy(), dtype=torch.float32), want[[1, 4]], rtol=1e-4, atol=1e-8)
    assert (est.attrs["answer"], est.attrs["foil"]) == (9, 11)


def test_requires_grad_is_restored_as_it_was_even_where_it_was_off(setup):
    client, _, _, engine = setup
    params = list(engine.model.parameters())
    params[0].requires_grad_(False)
    try:
        state = model_state(engine)
        djinn_nb.attribution_patching(client, CLEAN, CORRUPT, metric="prob")
        assert_unchanged(engine, state)
        assert params[0].requires_grad is False and params[1].requires_grad is True
    finally:
        params[0].requires_grad_(True)


def test_bad_requests_are_refused_by_name_and_change_nothing(setup):
    client, _, _, engine = setup
    before = {r["id"] for r in client.runs()}
    state = model_state(engine)
    n_heads = client.info["num_heads"]
    cases = [
        (dict(site="q"), "estimates a grid at one of"),
        (dict(site="mlp_out", heads=[0]), "heads are columns of a grid at site 'z' only"),
        (dict(site="z", heads=[n_heads]), f"heads must be integers in 0..{n_heads - 1}"),
        (dict(metric="kl"), "metric must be one of"),
        (dict(metric="prob", foil=3), "metric 'prob' takes none"),
        (dict(answer=10**6), "answer must be a token id"),
        (dict(foil=-1), "foil must be a token id"),
        (dict(layers=[99]), "layers must be integers"),
        (dict(positions=[8]), "positions must be integers"),
    ]
    for kwargs, message in cases:
        with pytest.raises(BadRequestError, match=message):
            djinn_nb.attribution_patching(client, CLEAN, CORRUPT, **kwargs)
    with pytest.raises(BadRequestError, match="same number of tokens: 8 vs 7"):
        djinn_nb.attribution_patching(client, CLEAN, CORRUPT[:7])
    for odd in ({"cells": [[0, 0]]}, {"site": 3}, {"heads": "x", "site": "z"}, {"metric": None}, {"foil": "a"},
                {"clean": None}, {"layers": [1.5]}):
        with pytest.raises(BadRequestError):
            client._call("attribution_patching", json.dumps(dict({"clean": CLEAN, "corrupted": CORRUPT}, **odd)))
    assert_unchanged(engine, state)
    assert {r["id"] for r in client.runs()} == before


def test_the_estimates_top_cells_are_patched_exactly_and_nothing_else(setup):
    client, _, _, _ = setup
    est = djinn_nb.attribution_patching(client, CLEAN, CORRUPT, site="mlp_out", metric="prob")
    exact = djinn_nb.causal_trace(client, CLEAN, CORRUPT, site="mlp_out", progress=False)
    cells = djinn_nb.top_k_of(est, 5)
    values = est.to_numpy()
    assert values[list(est.index).index(cells[0][0]), cells[0][1]] == values.max()
    some = djinn_nb.causal_trace(client, CLEAN, CORRUPT, site="mlp_out", cells=cells, progress=False)
    assert int(some.notna().sum().sum()) == 5
    for layer, position in cells:
        assert abs(some.loc[layer].iloc[position] - exact.loc[layer].iloc[position]) <= 1e-6
    agree = djinn_nb.rank_agreement(exact, exact, k=10)
    assert agree["spearman"] == pytest.approx(1.0) and agree["recall"] == 1.0
    assert -1.0 <= djinn_nb.rank_agreement(est, exact)["spearman"] <= 1.0


def test_top_k_of_orders_and_refuses():
    import pandas as pd

    grid = pd.DataFrame([[0.1, -0.9], [float("nan"), 0.5]], index=pd.Index([3, 4], name="layer"))
    grid.attrs.update(site="z", heads=[0, 2], positions=[0, 1])
    assert djinn_nb.top_k_of(grid, 2) == [(4, 2), (3, 0)]
    assert djinn_nb.top_k_of(grid, 9, absolute=True) == [(3, 2), (4, 2), (3, 0)]
    with pytest.raises(BadRequestError, match="k must be a positive integer"):
        djinn_nb.top_k_of(grid, 0)


def test_the_call_is_admitted_on_its_backwards_bytes_before_it_runs():
    from djinn_nb.serving.limits import Limits
    from serving import serve

    served = serve(limits=Limits(max_held_bytes=1_000_000))
    try:
        client = djinn_nb.connect(f"127.0.0.1:{served.server.port}")
        state = model_state(served.engine)
        with pytest.raises(QuotaError, match="max_held_bytes"):  # ~4.8 MB of activations (two rows) kept for the backward
            djinn_nb.attribution_patching(client, CLEAN, CORRUPT)
        assert_unchanged(served.engine, state)
        client.close()
    finally:
        served.server.close()
