"""Tables, figures and steering metrics."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import djinn_nb
from djinn_nb.notebook import metrics, plots

ACC = [
    {"layer": l, "trial": t, "token_accuracy": acc}
    for l, accs in ((3, (1.0, 1.0)), (6, (1.0, 0.5)), (9, (0.75, 1.0)))
    for t, acc in enumerate(accs)
]


def test_token_accuracy_table_and_figure():
    table = plots.token_accuracy_table(ACC)
    assert table.loc[6, "trial 1"] == 50.0 and table.loc[9, "trial 0"] == 75.0
    assert table.loc[6, "mean"] == 75.0 and table.loc[6, "std"] == 25.0 and table.loc[3, "std"] == 0.0
    fig = plots.plot_token_accuracy(pd.DataFrame(ACC))
    heights = sorted(round(p.get_height(), 6) for p in fig.axes[0].patches)
    assert heights == sorted(a["token_accuracy"] * 100 for a in ACC)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['trial'\]"):
        plots.token_accuracy_table([{"layer": 1, "token_accuracy": 1.0}])


def test_latency_breakdown_stacks_the_parts():
    rows = [
        {"label": "layer 3", "checkpoint_ms": 0.1, "restore_ms": 0.2, "remaining_ms": 5.0, "transport_ms": 1.0},
        {"label": "layer 3", "checkpoint_ms": 0.3, "restore_ms": 0.2, "remaining_ms": 7.0, "transport_ms": 1.0},
        {"label": "layer 9", "remaining_ms": 2.0, "transport_ms": 1.0, "checkpoint_ms": 0.1, "restore_ms": 0.1},
    ]
    table = plots.latency_breakdown_table(rows)
    assert table.loc["layer 3", "remaining_ms"] == 6.0 and table.loc["layer 3", "total_ms"] == pytest.approx(7.4)
    fig = plots.plot_latency_breakdown(rows)
    ax = fig.axes[0]
    ends = {}
    for patch in ax.patches:
        y = round(patch.get_y(), 3)
        ends[y] = max(ends.get(y, 0), patch.get_x() + patch.get_width())
    assert sorted(round(v, 6) for v in ends.values()) == [3.2, 7.4]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["checkpoint", "restore", "remaining layers", "transport"]
    with pytest.raises(ValueError, match="need at least one of the columns"):
        plots.latency_breakdown_table([{"label": "x", "other": 1}])


def test_steering_effect_one_line_per_layer():
    df = pd.DataFrame(
        [{"layer": l, "factor": f, "token_change_rate": abs(1 - f), "kl": (1 - f) ** 2, "logit_change": abs(1 - f) / 2}
         for l in (3, 6) for f in (0.0, 1.0, 2.0)]
    )
    def data_lines(ax):
        return [line for line in ax.get_lines() if line.get_marker() == "o"]  # not the factor-1 guide

    fig = plots.plot_steering_effect(df)
    assert len(fig.axes) == 3 and all(len(data_lines(ax)) == 2 for ax in fig.axes)
    kl_line = data_lines(fig.axes[1])[0]
    assert list(kl_line.get_xdata()) == [0.0, 1.0, 2.0] and list(kl_line.get_ydata()) == [1.0, 0.0, 1.0]
    single = plots.plot_steering_effect(df[df.layer == 3].drop(columns="layer"))
    assert all(len(data_lines(ax)) == 1 for ax in single.axes)


def test_activation_plot_and_png():
    t = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    fig = plots.plot_activation(t, ["a", "b", "c"], "title")
    bars = [p.get_height() for p in fig.axes[0].patches]
    assert bars == pytest.approx(t[0].norm(dim=-1).tolist())
    assert [x.get_text() for x in fig.axes[0].get_xticklabels()] == ["a", "b", "c"]
    png = plots.to_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_metric_functions():
    assert metrics.token_change_rate([1, 2, 3], [1, 2, 3]) == 0.0
    assert metrics.token_change_rate([1, 2, 3, 4], [1, 9, 3]) == 0.5  # one differs, one missing
    assert metrics.token_change_rate([], []) == 0.0
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])
    p, q = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    assert metrics.kl_divergence(a, b) == pytest.approx(float((p * (p / q).log()).sum()))
    assert metrics.kl_divergence(a, a + 5) == pytest.approx(0.0, abs=1e-12)  # shift-invariant
    assert metrics.relative_logit_change(a, b) == pytest.approx(math.sqrt(8) / math.sqrt(14))


def test_steering_sweep_matches_forks_and_closes_everything():
    client = djinn_nb.connect(model="random:llama-tiny")
    prompt = [9, 8, 7, 6, 5]
    before = {r["id"] for r in client.runs()}  # other tests' runs on the shared embedded server
    try:
        sweep = metrics.steering_sweep(client, prompt, [3, 8], [0.0, 1.0, 1.7], max_new_tokens=6)
        assert list(sweep.columns) == metrics.SWEEP_COLUMNS and len(sweep) == 6
        unit = sweep[sweep.factor == 1.0]
        assert (unit.token_change_rate == 0).all() and (unit.kl == 0).all() and (unit.logit_change == 0).all()
        assert {r["id"] for r in client.runs()} == before
        run = client.generate(prompt, max_new_tokens=6, breakpoints=[8], record_logits=True)
        with run.fork(breakpoints=[]) as base, run.fork(scale=1.7, breakpoints=[]) as f:
            row = sweep[(sweep.layer == 8) & (sweep.factor == 1.7)].iloc[0]
            assert row.token_ids == f.token_ids
            assert row.kl == pytest.approx(metrics.kl_divergence(base.logits(0), f.logits(0)))
            assert row.logit_change == pytest.approx(metrics.relative_logit_change(base.logits(0), f.logits(0)))
            assert row.token_change_rate == metrics.token_change_rate(base.token_ids, f.token_ids)
            assert row.fork_ms >= row.server_ms > 0
        run.close()
    finally:
        client.close()


def test_lens_grid_heatmap_colour_is_top1_probability_and_cells_are_labelled():
    layers, positions = 4, 3
    probs = torch.rand(layers, positions, 2).sort(dim=-1, descending=True).values
    ids = torch.arange(layers * positions * 2).reshape(layers, positions, 2)
    fig = plots.plot_lens_grid({"ids": ids, "probs": probs}, tokens=["The", " cat", " sat"],
                               decode=lambda toks: f"tok{toks[0]}")
    ax = fig.axes[0]
    assert torch.allclose(torch.as_tensor(ax.images[0].get_array()), probs[..., 0])
    texts = {(t.get_position(), t.get_text()) for t in ax.texts}
    assert ((1, 2), f"tok{int(ids[2, 1, 0])}") in texts and len(texts) == layers * positions
    assert [t.get_text() for t in ax.get_xticklabels()] == ["The", " cat", " sat"]
    assert ax.get_ylabel() == "layer"
    # no decoder: ids; explicit labels win
    fig = plots.plot_lens_grid({"ids": ids[..., :1], "probs": probs[..., :1]})
    assert f"#{int(ids[0, 0, 0])}" in [t.get_text() for t in fig.axes[0].texts]
    labels = [[f"L{l}P{p}" for p in range(positions)] for l in range(layers)]
    fig = plots.plot_lens_grid({"ids": ids, "probs": probs}, labels=labels)
    assert "L3P2" in [t.get_text() for t in fig.axes[0].texts]
    with pytest.raises(ValueError, match="layers, positions, k"):
        plots.plot_lens_grid({"ids": ids[0, 0], "probs": probs[0, 0]})


def test_attention_plot_has_one_heatmap_per_head():
    heads, q, k = 6, 4, 4
    att = torch.rand(1, heads, q, k).softmax(-1)
    keys = ["a", "b", "c", "d"]
    fig = plots.plot_attention(att, keys)
    maps = [ax for ax in fig.axes if ax.images]
    assert len(maps) == heads
    assert [ax.get_title() for ax in maps] == [f"head {h}" for h in range(heads)]
    for h, ax in enumerate(maps):
        assert torch.allclose(torch.as_tensor(ax.images[0].get_array()), att[0, h])
        assert [t.get_text() for t in ax.get_xticklabels()] == keys
        assert [t.get_text() for t in ax.get_yticklabels()] == keys
    one = [ax for ax in plots.plot_attention(att, keys, head=3).axes if ax.images]
    assert len(one) == 1 and one[0].get_title() == "head 3"
    # a decoding step: one query, the last key
    step = plots.plot_attention(torch.rand(heads, 1, 5).softmax(-1), ["a", "b", "c", "d", "e"])
    assert [t.get_text() for t in step.axes[0].get_yticklabels()] == ["e"]
    with pytest.raises(ValueError, match="head must be in 0..5"):
        plots.plot_attention(att, head=6)


def test_activation_plot_at_z_is_per_position():
    t = torch.randn(1, 3, 4, 8)
    fig = plots.plot_activation(t, ["a", "b", "c"])
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx(t[0].flatten(1).norm(dim=-1).tolist())
