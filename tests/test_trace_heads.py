"""Per-head and block-output grids of causal_trace, and ``cells=``, against plain HF + a torch hook
that patches the same one head's z / the attention or MLP output at (layer, position): every cell,
CPU fp32, random GPT-2 and Llama (issue 23, item 2)."""
from __future__ import annotations

import pytest
import torch

import djinn_nb
from djinn_nb.core import tracing
from djinn_nb.core.pause import Trace
from djinn_nb.core.reference import hf_model
from djinn_nb.errors import BadRequestError

CLEAN = [5, 17, 42, 99, 3, 250, 11, 7]
CORRUPT = [5, 17, 42, 31, 60, 250, 11, 7]  # positions 3 and 4 differ
ANSWER = 9
MODULES = {  # site -> (module path in block l, pre)
    "gpt2-tiny": {"z": ("attn.c_proj", True), "attn_out": ("attn", False), "mlp_out": ("mlp", False)},
    "llama-tiny": {"z": ("self_attn.o_proj", True), "attn_out": ("self_attn", False), "mlp_out": ("mlp", False)},
}
BLOCKS = {"gpt2-tiny": "transformer.h", "llama-tiny": "model.layers"}


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def setup(request, saved_models):
    path = saved_models[request.param]
    # in-process (embedded=True): test_cells_... spies on the server's tracing module in this process
    return djinn_nb.connect(model=path, device="cpu", embedded=True), hf_model(path), request.param


def ids(client):
    return {r["id"] for r in client.runs()}


def module_at(model, name, layer, site):
    path, pre = MODULES[name][site]
    return model.get_submodule(f"{BLOCKS[name]}.{layer}.{path}"), pre


def clean_value(model, module, pre):
    with Trace(module, pre=pre) as t, torch.no_grad():
        model(torch.tensor([CLEAN]))
    return t.value.clone()


def patched_prob(model, module, pre, write):
    def edit(h):
        h = h.clone()
        write(h)
        return h

    with Trace(module, pre=pre, edit=edit), torch.no_grad():
        return torch.softmax(model(torch.tensor([CORRUPT])).logits[0, -1].float(), -1)[ANSWER].item()


def head_reference(model, name, layers, heads, positions):
    n_heads = model.config.num_attention_heads
    grid = []
    for layer in layers:
        module, pre = module_at(model, name, layer, "z")
        clean = clean_value(model, module, pre)
        d = clean.shape[-1] // n_heads
        row = []
        for h in heads:
            def write(x, h=h, d=d, clean=clean):
                x[:, positions, h * d:(h + 1) * d] = clean[:, positions, h * d:(h + 1) * d]
            row.append(patched_prob(model, module, pre, write))
        grid.append(row)
    return grid


def output_reference(model, name, site, layers, positions):
    grid = []
    for layer in layers:
        module, pre = module_at(model, name, layer, site)
        clean = clean_value(model, module, pre)
        row = []
        for p in positions:
            def write(x, p=p, clean=clean):
                x[:, p] = clean[:, p]
            row.append(patched_prob(model, module, pre, write))
        grid.append(row)
    return grid


def assert_grid(frame, want):
    got = frame.to_numpy()
    assert got.shape == (len(want), len(want[0]))
    diff = max(abs(got[i][j] - want[i][j]) for i in range(len(want)) for j in range(len(want[0])))
    assert diff <= 1e-6, diff


def test_every_head_at_every_position_equals_a_hook_on_that_heads_z(setup):
    client, model, name = setup
    before = ids(client)
    n_layers, n_heads = client.info["num_layers"], client.info["num_heads"]
    frame = djinn_nb.causal_trace(client, CLEAN, CORRUPT, answer=ANSWER, site="z", heads="all", progress=False)
    assert list(frame.index) == list(range(n_layers)) and list(frame.columns) == list(range(n_heads))
    assert frame.columns.name == "head" and frame.attrs["heads"] == list(range(n_heads))
    assert frame.attrs["positions"] == list(range(len(CLEAN)))
    assert_grid(frame, head_reference(model, name, range(n_layers), range(n_heads), list(range(len(CLEAN)))))
    assert frame.to_numpy().std() > 1e-5  # the heads differ: a grid of copies would not
    assert ids(client) == before


def test_heads_at_one_position_equal_a_hook_restoring_that_position_only(setup):
    client, model, name = setup
    frame = djinn_nb.causal_trace(client, CLEAN, CORRUPT, answer=ANSWER, layers=[0, 2, 5], positions=[3],
                                  site="z", heads=[3, 1], progress=False)
    assert list(frame.columns) == [3, 1] and frame.attrs["positions"] == [3]
    assert_grid(frame, head_reference(model, name, [0, 2, 5], [3, 1], [3]))


@pytest.mark.parametrize("site", ["attn_out", "mlp_out"])
def test_every_cell_of_the_attention_and_mlp_rows_equals_a_hook_on_that_output(setup, site):
    client, model, name = setup
    n_layers = client.info["num_layers"]
    frame = djinn_nb.causal_trace(client, CLEAN, CORRUPT, answer=ANSWER, site=site, progress=False)
    assert frame.shape == (n_layers, len(CLEAN)) and frame.attrs["heads"] == []
    assert_grid(frame, output_reference(model, name, site, range(n_layers), range(len(CLEAN))))


def test_cells_patches_exactly_the_chosen_cells_and_nothing_else(setup, monkeypatch):
    """Each batch the trace runs holds one row per chosen cell (plus the unpatched reference once),
    each row the corrupted value with exactly that cell's slice written from the clean run."""
    client, model, name = setup
    full = djinn_nb.causal_trace(client, CLEAN, CORRUPT, answer=ANSWER, site="z", progress=False)
    chosen = [(4, 2), (1, 0), (4, 3), (9, 1)]
    batches = []
    real = tracing.patched_starts

    def spy(pending, clean, spec, cols, reference):
        starts = real(pending, clean, spec, cols, reference)
        batches.append((pending.clone(), clean.clone(), [spec.heads[j] for j in cols], reference, starts.clone()))
        return starts

    monkeypatch.setattr(tracing, "patched_starts", spy)
    frame = djinn_nb.causal_trace(client, CLEAN, CORRUPT, answer=ANSWER, site="z", cells=chosen, progress=False)
    assert frame.shape == full.shape
    for layer in frame.index:
        for head in frame.columns:
            if (layer, head) in chosen:
                assert frame.loc[layer, head] == pytest.approx(full.loc[layer, head], abs=1e-6)
            else:
                assert frame.loc[layer, head] != frame.loc[layer, head]  # NaN: not computed
    assert [b[2] for b in batches] == [[0], [2, 3], [1]]  # layers 1, 4, 9: only their chosen heads
    assert [b[3] for b in batches] == [True, False, False]  # the corrupted reference rides once
    for pending, clean, heads, reference, starts in batches:
        assert starts.shape[0] == len(heads) + int(reference)
        for row, h in enumerate(heads):
            want = pending[0].clone()
            want[:, h] = clean[0, :, h]  # every position of the grid, that head only
            assert torch.equal(starts[row], want)
        if reference:
            assert torch.equal(starts[-1], pending[0])


def test_cells_at_positions_are_computed_and_the_rest_is_nan(setup):
    client, model, name = setup
    frame = djinn_nb.causal_trace(client, CLEAN, CORRUPT, answer=ANSWER, site="mlp_out", cells=[(2, 3), (7, 4)],
                                  progress=False)
    want = output_reference(model, name, "mlp_out", [2, 7], [3, 4])
    assert abs(frame.iloc[2, 3] - want[0][0]) <= 1e-6 and abs(frame.iloc[7, 4] - want[1][1]) <= 1e-6
    assert int(frame.notna().sum().sum()) == 2


def test_bad_grids_are_refused_by_name_and_change_nothing(setup):
    client, _, _ = setup
    before = ids(client)
    n_heads = client.info["num_heads"]
    cases = [
        (dict(site="q"), "patches one of"),
        (dict(site="mlp_out", heads="all"), "heads are columns of a grid at site 'z' only"),
        (dict(site="z", heads=[n_heads]), f"heads must be integers in 0..{n_heads - 1}"),
        (dict(site="z", heads=[0, 0]), "heads must be distinct"),
        (dict(site="z", heads="some"), "heads must be 'all' or a non-empty list"),
        (dict(site="z", cells=[(0, n_heads)]), "outside the grid"),
        (dict(site="resid_post", cells=[(0, 8)]), "outside the grid"),
        (dict(site="resid_post", layers=[1, 2], cells=[(0, 1)]), "outside the grid"),
        (dict(site="resid_post", cells=[(0, 1, 2)]), "pairs of integers"),
        (dict(site="resid_post", cells=[]), "cells is empty"),
    ]
    for kwargs, message in cases:
        with pytest.raises(BadRequestError, match=message):
            djinn_nb.causal_trace(client, CLEAN, CORRUPT, progress=False, **kwargs)
    assert ids(client) == before


def test_the_server_call_refuses_odd_heads_and_cells_by_name(setup):
    import json

    client, _, _ = setup
    before = ids(client)
    base = {"clean": CLEAN, "corrupted": CORRUPT, "site": "z"}
    for odd in ({"heads": 5}, {"heads": [True]}, {"heads": ["0"]}, {"cells": 5}, {"cells": [[1, "a"]]},
                {"cells": [[0, 0]] * 100_000}, {"site": "resid_post", "heads": [0]}, {"site": ["z"]}):
        with pytest.raises(BadRequestError):
            client._call("causal_trace", json.dumps(dict(base, **odd)))
    assert ids(client) == before


def test_the_plots_name_heads_and_sites():
    import pandas as pd

    from djinn_nb.notebook.patching import plot_trace_panels
    from djinn_nb.notebook.tracing import plot_causal_trace

    heads = pd.DataFrame([[0.1, 0.6], [0.2, float("nan")]], index=pd.Index([0, 1], name="layer"),
                         columns=pd.Index([0, 1], name="head"))
    heads.attrs.update(clean_prob=0.7, corrupt_prob=0.01, answer=7, answer_text=" Paris", site="z",
                       positions=[0, 1, 2, 3], heads=[0, 1])
    fig = plot_causal_trace(heads)
    assert fig.axes[0].get_ylabel() == "restored head (at positions 0-3)"
    rows = []
    for site in ("resid_post", "mlp_out", "attn_out"):
        f = pd.DataFrame([[0.1, 0.6]], index=pd.Index([0], name="layer"), columns=["0: The", "1:  Eiffel"])
        f.attrs.update(clean_prob=0.7, corrupt_prob=0.01, answer=7, answer_text=" Paris", site=site, positions=[0, 1])
        rows.append(f)
    fig = plot_trace_panels(rows)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["restored at resid_post", "restored at mlp_out", "restored at attn_out"]
