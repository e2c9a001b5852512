"""HTML and tables for runs, clients, activations and token comparisons."""
from __future__ import annotations

import re

import pytest

import djinn_nb
from djinn_nb.notebook import display as D
from djinn_nb.notebook.formatters import client_card, run_card
from djinn_nb.wire.messages import RunSummary

PROMPT = [3, 1, 4, 1, 5]


@pytest.fixture(scope="module")
def client():
    c = djinn_nb.connect(model="random:llama-tiny")
    yield c
    c.close()


def test_run_html_shows_where_it_paused_tokens_shape_and_bytes(client):
    run = client.generate(PROMPT, max_new_tokens=6, breakpoints=[(4, 2)])
    page = run_card(run)
    assert "paused at layer 4 (resid_post) at step 2 (decoding)" in page
    assert "2 of 6" in page  # tokens so far
    assert f"shape (1, 1, {client.info['hidden_size']}), float32" in page
    assert D.format_bytes(run.bytes_held) in page and run.bytes_held > 0
    assert " ".join(str(t) for t in run.token_ids) in page  # no tokenizer: ids
    run.resume()
    page = run_card(run)
    assert ">done<" in page and "6 of 6" in page and "shape" not in page
    run.close()


def test_client_html_shows_model_layers_and_runs(client):
    run = client.generate(PROMPT, max_new_tokens=2, breakpoints=[1])
    page = client_card(client)
    assert "random:llama-tiny" in page and "breakpoint layers 0..11" in page
    assert "no: prompts are token-id lists" in page
    assert re.search(r"\d+ holding [\d.]+ (B|KiB|MiB)", page)
    import torch

    assert re.search(rf"CPU threads</th><td[^>]*>{torch.get_num_threads()} \(idle ones wait: ", page)
    run.close()


class _EvilDecoder:
    def decode(self, ids):
        return "<script>alert(1)</script>"


def _evil_summary() -> RunSummary:
    """A run summary whose every text field tries to inject markup."""
    return RunSummary(id="<b>r1</b>", state="failed", step=0, layer=None, site=None, token_ids=[1], prompt_ids=[1],
                      max_new_tokens=4, parent="<i>p</i>", timings_ms={"<x>": 1.0},
                      error="<img src=x onerror=alert(1)>")


def test_all_text_is_escaped():
    page = D.run_html(_evil_summary(), _EvilDecoder())
    for raw in ("<script>", "<b>r1", "<i>p", "<img", "<x>"):
        assert raw not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x" in page
    cmp_page = D.compare_html(["<a>", "b"], [1, 2], ["<a>", "<c>"], [1, 3], "<label>")
    assert "<a>" not in cmp_page and "<c>" not in cmp_page and "&lt;label&gt;" in cmp_page
    stats = {"shape": [1, 1, 2], "dtype": "float32", "norm": 1, "mean": 0, "std": 0, "min": 0, "max": 1,
             "position_norm": [1.0], "position_mean": [0.0], "position_max": [1.0]}
    assert "<evil>" not in D.activation_html(stats, ["<evil>"]) and "&lt;evil&gt;" in D.activation_html(stats, ["<evil>"])


def test_compare_marks_exactly_the_changed_tokens():
    page = D.compare_html(["a", "b", "c"], [1, 2, 3], ["a", "x", "c", "d"], [1, 9, 3, 4], "scale 0.5")
    marked = re.findall(r"<span style='background:#ffe08a[^']*'[^>]*>([^<]*)</span>", page)
    assert marked == ["x", "d"]
    assert re.findall(r"<span style='background:#f8c9c9[^']*'[^>]*>([^<]*)</span>", page) == ["b"]
    assert "2 of 4 tokens changed (1 replaced, 1 inserted)" in page
    assert D.changed_positions([1, 2, 3], [1, 2]) == [False, False]
    c = D.Comparison([1, 2, 3], ["a", "b", "c"], [1, 2], ["a", "b"], "short")
    assert c.changed == 1  # a missing token counts
    assert "short: 'ab'" in repr(c)


def test_activation_table_and_object(client):
    run = client.generate(PROMPT, max_new_tokens=2, breakpoints=[6])
    stats = run.activation_stats
    table = D.activation_table(stats, [f"#{t}" for t in PROMPT])
    assert list(table.columns) == ["token", "norm", "mean", "max"] and table.index.name == "position"
    h = run.activation()[0]
    assert table["norm"].tolist() == pytest.approx(h.norm(dim=-1).tolist(), rel=1e-5)
    assert table["max"].tolist() == pytest.approx(h.max(dim=-1).values.tolist(), rel=1e-5)
    assert table["token"].tolist() == ["#3", "#1", "#4", "#1", "#5"]
    act = D.Activation(run.id, 6, 0, run.activation(), stats, ["#3", "#1", "#4", "#1", "#5"])
    page = act._repr_html_()
    assert f"run {run.id}, output of layer 6 at step 0" in page and "#4" in page
    assert "(1, 5, 64) float32" in repr(act)
    run.close()


def test_format_bytes_and_token_fallback(client):
    assert [D.format_bytes(n) for n in (0, 1023, 1536, 3 * 2**20, 5 * 2**30)] == [
        "0 B", "1023 B", "1.5 KiB", "3.0 MiB", "5.0 GiB"]
    assert D.token_strings(client, [7, 8]) == ["#7", "#8"]
    assert D.decode_text(client, [7, 8]) == "7 8"
