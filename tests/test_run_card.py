"""What the notebook shows of a run: the condition that held at a conditional pause, timings named for
what they measure, breakpoints and their listing, the token history's newline tokens, the lens's
digits and the single-head attention title."""
from __future__ import annotations

import re

import pytest

import djinn_nb
from djinn_nb.notebook import display as D
from djinn_nb.notebook.formatters import run_card
from djinn_nb.notebook.history import TokenHistory, visible

PROMPT = [3, 1, 4, 1, 5]


@pytest.fixture(scope="module")
def client():
    return djinn_nb.connect(model="random:llama-tiny")


def test_a_conditional_pause_shows_the_condition_and_the_values_that_held(client):
    run = client.generate(PROMPT, max_new_tokens=6,
                          breakpoints=[{"layer": 2, "step": "all", "when": "step >= 3 and top1_prob > 0"}])
    assert run.paused and run.step == 3
    s = run._details()
    assert s.held["step"] == 3 and len(s.held["conditions"]) == 1
    held = s.held["conditions"][0]
    assert (held["layer"], held["site"]) == (2, "resid_post")
    assert held["values"]["step"] == 3
    page = run_card(run)
    assert re.search(r"condition held</th><td[^>]*><pre[^>]*>step 3: step &gt;= 3 and top1_prob &gt; 0 held at "
                     r"layer 2 resid_post \(step 3, top1_prob 0\.\d+", page)
    assert "layer 2 step all resid_post when step &gt;= 3 and top1_prob &gt; 0" in page
    run.next_layer()  # not a conditional pause: no condition to show
    assert "condition held" not in run_card(run)
    run.run_to_end()
    step3 = run.history()[3]  # the step the condition examined (undone, then replayed to pause in it)
    assert held["values"]["top1_prob"] == pytest.approx(step3["topk"][0][1], rel=1e-6)
    run.close()


def test_an_unconditional_pause_shows_no_condition(client):
    run = client.generate(PROMPT, max_new_tokens=3, breakpoints=[(1, 1)])
    assert run._details().held is None and "condition held" not in run_card(run)
    run.close()


def test_timings_are_named_for_what_they_measure(client):
    run = client.generate(PROMPT, max_new_tokens=3, breakpoints=[(1, 1)])
    page = run_card(run)
    assert "server time of the last call" in page and "forward to the pause" in page
    assert ">timings<" not in page and "checkpoint " not in page  # read as a checkpoint's cost
    fork = run.fork(breakpoints=[])
    text = D.timings_text(fork.timings_ms)
    assert re.fullmatch(r"fork copy [\d.]+ ms, execute [\d.]+ ms", text)
    fork.close()
    run.close()


def test_break_listing_reads_as_a_sentence():
    empty = D.BreakpointList([])
    assert repr(empty).startswith("no breakpoints (add one: %djinn_break layer=6")
    listed = D.BreakpointList([{"layer": 2, "step": "all", "site": "resid_post"},
                               {"layer": 5, "step": 0, "site": "mlp_out", "when": "entropy > 2"}])
    assert listed == [{"layer": 2, "step": "all", "site": "resid_post"},
                      {"layer": 5, "step": 0, "site": "mlp_out", "when": "entropy > 2"}]
    assert repr(listed) == "breakpoints: layer 2 step all resid_post; layer 5 step 0 mlp_out when entropy > 2"


def test_newline_and_empty_tokens_are_visible_in_the_history():
    assert visible("\n") == "⏎" and visible("a\tb\r") == "a⇥b␍" and visible("") == "∅" and visible(" x") == " x"
    records = [{"step": 0, "token_id": 1, "token": "Hi", "topk": [(1, 0.9), (2, 0.1)], "entropy": 0.3},
               {"step": 1, "token_id": 2, "token": "\n", "topk": [(2, 0.6), (1, 0.4)], "entropy": 0.7}]
    page = TokenHistory(records)._repr_html_()
    assert "data-step='1'>⏎<span class='card'>" in page and "</span></span><br>" in page
    room = int(re.search(r"class='djinn-hist' style='padding-bottom:(\d+)px'", page).group(1))
    assert room >= (2 + 3) * 16  # the header, k alternatives and the %djinn_rewind line fit below the text


def test_lens_rows_print_four_digits_and_keep_exact_values(client):
    run = client.generate(PROMPT, max_new_tokens=2, breakpoints=[(3, 0)])
    rows = run.lens(k=3)
    assert len(rows) == len(PROMPT) and all(len(r) == 3 for r in rows)
    text = repr(rows)
    assert not re.search(r"\d\.\d{6,}", text)  # no 16-digit floats
    assert f"({rows[0][0][0]}, {rows[0][0][1]:.4g})" in text
    assert isinstance(rows[0][0][1], float) and rows == [list(r) for r in rows]
    run.close()


def test_a_single_heads_attention_title_fits_its_figure(client):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from djinn_nb.notebook.plots import plot_attention

    run = client.generate(PROMPT, max_new_tokens=2, breakpoints=[(3, 1)])
    title = "layer 3, step 1: attention of the new token, head 1 (query 5 over keys 0..5)"
    fig = plot_attention(run.attention(), head=1, title=title)
    FigureCanvasAgg(fig).draw()
    box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width
    run.close()


def test_the_run_card_reads_the_summary_the_client_already_checked(client, monkeypatch):
    """Rendering a run parses nothing again: the card reads the typed summary the client checked once
    when it arrived (``Run.details``), and a run that changed is asked for once."""
    from djinn_nb.wire.messages import RunSummary

    run = client.generate(PROMPT, max_new_tokens=3, breakpoints=[1])
    run.summary  # noqa: B018 - the summary, read and checked once
    parses = []
    real = RunSummary.from_json.__func__

    def counting(cls, obj):
        parses.append(obj)
        return real(cls, obj)

    monkeypatch.setattr(RunSummary, "from_json", classmethod(counting))
    assert run.details is run._details() and "layer 1" in run_card(run)
    assert parses == []
    run.resume()  # the run changed: one summary asked for and checked, for the card and the property alike
    run_card(run)
    run.summary  # noqa: B018
    assert len(parses) == 1
    run.close()
