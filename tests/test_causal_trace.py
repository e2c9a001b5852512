"""Causal tracing through the client: the grid's cells against what restoring must give, its
errors, and that it leaves no runs behind."""
from __future__ import annotations

import pytest
import torch

import djinn_nb
from djinn_nb.core.reference import hf_model
from djinn_nb.errors import BadRequestError

CLEAN = [5, 17, 42, 99, 3, 250, 11, 7]
CORRUPT = [5, 17, 42, 31, 3, 250, 11, 7]  # position 3 differs


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def setup(request, saved_models):
    path = saved_models[request.param]
    return djinn_nb.connect(model=path, device="cpu"), hf_model(path)


def next_token_probs(model, ids):
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)


def ids(client):
    return {r["id"] for r in client.runs()}  # the embedded server is shared with other test modules


def test_resid_pre_at_layer_0_restores_exactly_the_differing_position(setup):
    client, model = setup
    before = ids(client)
    frame = djinn_nb.causal_trace(client, CLEAN, CORRUPT, layers=[0, 1], site="resid_pre", progress=False)
    clean_p, corrupt_p = next_token_probs(model, CLEAN), next_token_probs(model, CORRUPT)
    answer = int(clean_p.argmax())
    assert frame.attrs["answer"] == answer
    assert frame.attrs["clean_prob"] == pytest.approx(clean_p[answer].item(), rel=1e-5)
    assert frame.attrs["corrupt_prob"] == pytest.approx(corrupt_p[answer].item(), rel=1e-5)
    assert list(frame.index) == [0, 1] and frame.shape == (2, len(CLEAN))
    row = frame.loc[0].tolist()
    # rows of one batched matmul agree to float rounding on CPU, not always bit for bit (README)
    assert row[3] == pytest.approx(frame.attrs["clean_prob"], rel=1e-5)
    assert all(p == pytest.approx(frame.attrs["corrupt_prob"], rel=1e-5) for i, p in enumerate(row) if i != 3)
    assert frame.attrs["clean_prob"] != pytest.approx(frame.attrs["corrupt_prob"], rel=1e-3)
    assert ids(client) == before


def test_resid_post_last_position_after_the_last_layer_gives_the_clean_probability(setup):
    client, model = setup
    before = ids(client)
    last = client.info["num_layers"] - 1
    frame = djinn_nb.causal_trace(client, CLEAN, CORRUPT, answer=9, layers=[last], positions=[2, 7], progress=False)
    assert frame.attrs["answer"] == 9
    assert frame.loc[last].tolist()[1] == pytest.approx(frame.attrs["clean_prob"], rel=1e-5)
    # position 2 is identical in both prompts
    assert frame.loc[last].tolist()[0] == pytest.approx(frame.attrs["corrupt_prob"], rel=1e-5)
    assert frame.attrs["clean_prob"] == pytest.approx(next_token_probs(model, CLEAN)[9].item(), rel=1e-5)
    assert ids(client) == before


def test_every_cell_equals_a_hook_patching_one_position(setup, saved_models):
    client, model = setup
    layer = 1
    frame = djinn_nb.causal_trace(client, CLEAN, CORRUPT, answer=9, layers=[layer], positions=[1, 3, 6],
                                  progress=False)
    blocks = model.get_submodule("transformer.h" if hasattr(model, "transformer") else "model.layers")
    from djinn_nb.core.pause import Trace

    with Trace(blocks[layer]) as t, torch.no_grad():
        model(torch.tensor([CLEAN]))
    clean_h = t.value.clone()
    for col, p in enumerate([1, 3, 6]):
        def write(h, p=p):
            h = h.clone()
            h[:, p] = clean_h[:, p]
            return h

        with Trace(blocks[layer], edit=write):
            want = next_token_probs(model, CORRUPT)[9].item()
        assert frame.loc[layer].tolist()[col] == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_bad_input_is_refused_and_leaves_no_runs(setup):
    client, _ = setup
    before = ids(client)
    with pytest.raises(BadRequestError, match="same number of tokens: 8 vs 7"):
        djinn_nb.causal_trace(client, CLEAN, CORRUPT[:7], progress=False)
    with pytest.raises(BadRequestError, match="layers must be integers"):
        djinn_nb.causal_trace(client, CLEAN, CORRUPT, layers=[99], progress=False)
    with pytest.raises(BadRequestError, match="positions must be integers"):
        djinn_nb.causal_trace(client, CLEAN, CORRUPT, positions=[8], progress=False)
    with pytest.raises(BadRequestError, match="not 'attn'"):
        djinn_nb.causal_trace(client, CLEAN, CORRUPT, site="attn", progress=False)
    with pytest.raises(BadRequestError, match="answer must be a token id"):
        djinn_nb.causal_trace(client, CLEAN, CORRUPT, answer=10**9, layers=[0], progress=False)
    assert ids(client) == before


def test_the_server_call_refuses_odd_json_by_name(setup):
    """The raw call (no client checks): every odd shape is a BadRequestError, never an internal error."""
    import json

    client, _ = setup
    before = ids(client)
    base = {"clean": CLEAN, "corrupted": CORRUPT}
    for odd in ({"layers": 5}, {"positions": 5}, {"layers": [[1]]}, {"layers": [1, "a"]}, {"layers": {"1": 2}},
                {"clean": 5}, {"clean": None}, {"corrupted": {"a": 1}}, {"positions": [True]}):
        with pytest.raises(BadRequestError):
            client._call("causal_trace", json.dumps(dict(base, **odd)))
    assert ids(client) == before


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"])
def test_clean_and_corrupted_probabilities_are_the_runs_own_at_every_site(setup, site):
    """clean_prob was computed by restoring every position of the first traced layer: the clean run
    only at residual sites (on the embedded model's Eiffel Tower example 0.6838 at mlp_out and 0.0000
    at attn_out against the true 0.7015)."""
    client, model = setup
    before = ids(client)
    frame = djinn_nb.causal_trace(client, CLEAN, CORRUPT, answer=9, layers=[1, 2], positions=[3], site=site,
                                  progress=False)
    assert frame.attrs["clean_prob"] == pytest.approx(next_token_probs(model, CLEAN)[9].item(), rel=1e-5)
    assert frame.attrs["corrupt_prob"] == pytest.approx(next_token_probs(model, CORRUPT)[9].item(), rel=1e-5)
    assert frame.attrs["answer_text"] is None  # these models have no tokenizer
    assert ids(client) == before


def _rendered(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


def test_the_plot_marks_both_probabilities(setup):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    client, _ = setup
    open_before = plt.get_fignums()
    frame = djinn_nb.causal_trace(client, CLEAN, CORRUPT, layers=[0, 1], positions=[2, 3], progress=False)
    fig = djinn_nb.plot_causal_trace(frame)
    assert isinstance(fig, Figure) and plt.get_fignums() == open_before  # shown once as a cell's last line
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert legend == [f"clean run: {frame.attrs['clean_prob']:.4f}", f"corrupted run: {frame.attrs['corrupt_prob']:.4f}"]
    assert f"#{frame.attrs['answer']}" in fig.axes[0].get_title()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["2", "3"]
    renderer = _rendered(fig)
    ticks = [t.get_window_extent(renderer) for t in fig.axes[1].get_yticklabels() if t.get_text()]
    marks = [t.get_window_extent(renderer) for leg in fig.legends for t in leg.get_texts()]
    assert ticks and not any(a.overlaps(b) for a in ticks for b in marks)  # no label overprints a tick
    assert all(0 <= b.x0 and b.x1 <= fig.bbox.width and 0 <= b.y0 for b in marks)  # inside the figure


def test_the_plot_names_the_answer_by_text_and_id():
    import pandas as pd

    from djinn_nb.notebook.tracing import plot_causal_trace

    frame = pd.DataFrame([[0.1, 0.6]], index=pd.Index([0], name="layer"), columns=["0: The", "1:  Eiffel"])
    frame.attrs.update(clean_prob=0.7015, corrupt_prob=0.0001, answer=7042, answer_text=" Paris", site="mlp_out")
    fig = plot_causal_trace(frame)
    assert fig.axes[0].get_title() == "p(' Paris' #7042) with the clean state restored"
    assert fig.axes[1].get_ylabel() == "p(' Paris' #7042)"
    assert "restored at mlp_out" in fig.axes[0].get_xlabel()
