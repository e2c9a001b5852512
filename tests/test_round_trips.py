"""Every user action is O(1) round trips (issue 21): counted at the rpyc protocol level.

The embedded SmolLM2 (a tokenizer, so texts are decoded), behind its loopback server; each
action runs at two prompt lengths (and two top-k/lens sizes) and must cost the same number
of requests at both, within its budget: a run paused after ``generate`` with its run card
1, ``fork(...).text`` 1, ``%djinn_resume`` (with its comparison) 3, ``%djinn_inspect`` 3,
a slider move 2, ``client.runs()`` 1.
"""
from __future__ import annotations

import pytest
from IPython.utils.capture import capture_output

from ipython_shell import djinn_shell, magic
from experiments.harness.round_trips import count_requests

import djinn_nb
from djinn_nb.notebook.formatters import run_card
from djinn_nb.notebook.widgets import SteeringWidget

SHORT = "The capital of France is"
LONG = ("Once upon a time, in a small village by the sea, there lived an old fisherman who every morning "
        "walked to the harbour, mended his nets and told the children stories of the storms he had seen. "
        "One day a stranger arrived and asked him")
PROMPTS = (SHORT, LONG)
BUDGET = {"generate": 1, "fork_text": 1, "resume": 3, "inspect": 3, "slider": 2, "runs": 1}


@pytest.fixture(scope="module")
def client():
    c = djinn_nb.connect()
    yield c
    c.close()


@pytest.fixture(scope="module")
def shell():
    with djinn_shell() as sh:
        with capture_output():
            magic(sh, "djinn_connect")
        yield sh


def _magics(shell):
    return shell.magics_manager.registry["DjinnMagics"]


def _close_all(client):
    for r in client.runs():
        client.attach(r["id"]).close()


def test_generate_to_a_pause_with_its_run_card(client):
    counts = []
    for prompt in PROMPTS:
        with djinn_nb.connect() as fresh:  # a fresh connection: nothing looked up or cached yet
            with count_requests(fresh) as sent:
                run = fresh.generate(prompt, max_new_tokens=6, breakpoints=[(3, 2)])
                card = run_card(run)
            assert run.paused and run.text in card or run.text.replace("'", "&#x27;") in card
            counts.append(sent)
            run.close()
    assert counts[0].n == counts[1].n <= BUDGET["generate"], counts


def test_fork_text(client):
    counts = []
    for prompt in PROMPTS:
        run = client.generate(prompt, max_new_tokens=6, breakpoints=[4])
        ref = client.generate(prompt, max_new_tokens=6, breakpoints=[4])
        ref_fork = ref.fork(scale=0.5, breakpoints=[])
        expected = client.decode(ref_fork.token_ids)
        with count_requests(client) as sent:
            text = run.fork(scale=0.5, breakpoints=[]).text
        assert text == expected
        counts.append(sent)
        _close_all(client)
    assert counts[0].n == counts[1].n <= BUDGET["fork_text"], counts


def test_client_runs(client):
    counts = []
    for n in (1, 6):
        runs = [client.generate(SHORT, max_new_tokens=4, breakpoints=[2]) for _ in range(n)]
        with count_requests(client) as sent:
            rows = client.runs()
        assert len(rows) == n
        counts.append(sent)
        for r in runs:
            r.close()
    assert counts[0].n == counts[1].n == BUDGET["runs"], counts


@pytest.mark.parametrize("edit", ["", "scale=0.9"])
def test_magic_resume(shell, edit):
    m = _magics(shell)
    counts = []
    for prompt in PROMPTS:
        magic(shell, "djinn_break clear")
        magic(shell, "djinn_break layer=5")
        with capture_output():
            magic(shell, f"djinn_run max_new_tokens=6 {prompt}")
        with count_requests(m.client) as sent, capture_output():
            run = magic(shell, f"djinn_resume {edit}")
        assert run.done
        counts.append(sent)
        _close_all(m.client)
    assert counts[0].n == counts[1].n <= BUDGET["resume"], counts


@pytest.mark.parametrize("step", [0, 2])
def test_magic_inspect(shell, step):
    m = _magics(shell)
    counts = []
    for prompt, k in ((SHORT, 3), (LONG, 8)):
        magic(shell, "djinn_break clear")
        magic(shell, f"djinn_break layer=5 step={step}")
        with capture_output():
            magic(shell, f"djinn_run max_new_tokens=6 {prompt}")
        with count_requests(m.client) as sent, capture_output():
            act = magic(shell, f"djinn_inspect plot=false lens={k}")
        assert len(act.lens_tokens[0]) == k and "?" not in act.tokens
        counts.append(sent)
        _close_all(m.client)
    assert counts[0].n == counts[1].n <= BUDGET["inspect"], counts


def test_slider_move(client):
    counts = []
    for prompt, k in ((SHORT, 3), (LONG, 5)):
        run = client.generate(prompt, max_new_tokens=6, breakpoints=[4])
        w = SteeringWidget(client, run, top_k=k)
        try:
            w.set(0.25)
            with count_requests(client) as sent:
                result = w.set(0.5)
        finally:
            w.close()
        with run.fork(scale=0.5, breakpoints=[]) as f:
            assert result.token_ids == f.token_ids and result.text == client.decode(f.token_ids)
        assert result.comparison.alternatives and len(result.comparison.alternatives[0]) == k
        counts.append(sent)
        run.close()
    assert counts[0].n == counts[1].n <= BUDGET["slider"], counts


def test_a_fork_closed_at_once_reads_as_a_kept_one(client):
    """``fork(close=True)``: nothing stays on the server; its tokens, text and history (texts
    included) are those of the same fork kept open."""
    run = client.generate(LONG, max_new_tokens=6, breakpoints=[(4, 2)])
    kept = run.fork(scale=0.5, breakpoints=[])
    with count_requests(client) as sent:
        gone = run.fork(scale=0.5, breakpoints=[], close=True)
        seen = (gone.token_ids, gone.text, gone.history())
        gone.close()
    assert sent.n == 1 and str(gone.state) == "closed"
    assert {r["id"] for r in client.runs()} == {run.id, kept.id}
    history = kept.history()

    def untimed(records):  # when each token was picked differs between the two forks
        return [{k: v for k, v in r.items() if k != "time_s"} for r in records]

    assert seen[:2] == (kept.token_ids, client.decode(kept.token_ids))
    assert untimed(seen[2]) == untimed(history)
    assert [r["token"] for r in history] == client.decode_each(kept.token_ids)
    _close_all(client)


@pytest.mark.parametrize("progress", [False, True])
def test_causal_trace_costs_at_most_three_requests_whatever_the_grids_size(client, progress):
    """One server call (three with a progress bar), at two grid sizes: the grid is computed on the
    server (it cost a chain of forks, a fork_many, a token_probs and a close per cell before)."""
    counts = []
    for clean, corrupted in (("The Eiffel Tower is in", "The Colosseum is in"),
                             ("The Eiffel Tower is a famous landmark in the city of",
                              "The Colosseum is a famous landmark in the city of")):
        if len(client.tokenize(clean)) != len(client.tokenize(corrupted)):
            pytest.skip("the pair does not tokenize to equal lengths")
        with count_requests(client) as sent:
            frame = djinn_nb.causal_trace(client, clean, corrupted, progress=progress)
        assert frame.shape[0] == client.info["num_layers"] and sent.n <= (3 if progress else 1), sent
        counts.append(sent.n)
    assert counts[0] == counts[1]
    assert client.runs() == []  # every run it made is closed


def test_attribution_patching_and_a_trace_of_its_top_cells_cost_one_request_each(client):
    """The estimate (two forwards and a backward) is one server call at any grid size, and so is the
    exact trace of the cells it ranks highest, progress bar or not."""
    clean, corrupted = "The Eiffel Tower is in", "The Colosseum is in"
    with count_requests(client) as sent:
        estimate = djinn_nb.attribution_patching(client, clean, corrupted, site="z", metric="prob")
    assert sent.n == 1 and estimate.shape == (client.info["num_layers"], client.info["num_heads"])
    with count_requests(client) as sent:
        chosen = djinn_nb.causal_trace(client, clean, corrupted, site="z", cells=djinn_nb.top_k_of(estimate, 4))
    assert sent.n == 1 and int(chosen.notna().sum().sum()) == 4
    assert client.runs() == []
