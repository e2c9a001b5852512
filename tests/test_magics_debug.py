"""The debugger magics (conditional breakpoints, patching, next layer/step, rewind, history) through a
real IPython shell, each against the same call on the client API."""
from __future__ import annotations

import pytest
import torch
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from ipython_shell import djinn_shell, magic

from djinn_nb.notebook.history import TokenHistory

MODEL = "random:gpt2-tiny"
PROMPT = [5, 17, 42, 99, 7]
N = 8


@pytest.fixture(scope="module")
def shell():
    with djinn_shell() as sh:
        yield sh


@pytest.fixture
def client(shell):
    c = shell.run_line_magic("djinn_connect", f"model={MODEL}")
    shell.run_line_magic("djinn_break", "clear")
    yield c
    for r in c.runs():
        c.attach(r["id"]).close()



def test_conditional_break_pauses_where_the_client_api_does(shell, client):
    with capture_output() as cap:
        magic(shell, 'djinn_break layer=2 step=all when="step >= 3 and entropy > 0"')
    assert "when step >= 3 and entropy > 0" in cap.stdout
    run = magic(shell, f"djinn_run max_new_tokens={N} {PROMPT}")
    ref = client.generate(PROMPT, max_new_tokens=N,
                          breakpoints=[{"layer": 2, "step": "all", "when": "step >= 3 and entropy > 0"}])
    assert (run.step, run.layer) == (ref.step, ref.layer) == (3, 2)
    assert torch.equal(run.activation(), ref.activation())
    with pytest.raises(UsageError, match="unknown term 'entropi'"):
        magic(shell, 'djinn_break layer=2 when="entropi > 1"')
    with pytest.raises(UsageError, match="condition"):
        magic(shell, "djinn_break layer=2 when=\"__import__('os')\"")


def test_resume_patch_from_equals_the_client_api(shell, client):
    src = client.generate(PROMPT, max_new_tokens=N, breakpoints=[2])
    magic(shell, "djinn_break layer=2")
    magic(shell, f"djinn_run max_new_tokens={N} {[5, 17, 1, 2, 7]}")
    with capture_output():
        run = magic(shell, f"djinn_resume patch_from={src.id} positions=2,3 compare=false")
    ref = client.generate([5, 17, 1, 2, 7], max_new_tokens=N, breakpoints=[2]).fork(
        patch_from=src, positions=[2, 3], breakpoints=[])
    assert run.token_ids == ref.token_ids
    magic(shell, f"djinn_run max_new_tokens={N} {PROMPT}")
    with pytest.raises(UsageError, match="add patch_from="):
        magic(shell, "djinn_resume positions=1")


def test_next_layer_next_step_rewind_and_history(shell, client):
    magic(shell, "djinn_break layer=1 step=2")
    run = magic(shell, f"djinn_run max_new_tokens={N} {PROMPT}")
    with capture_output() as cap:
        same = magic(shell, "djinn_next_layer")
    assert same is run and (run.layer, run.step) == (2, 2) and "paused at layer 2 resid_post, step 2" in cap.stdout
    with capture_output():
        magic(shell, "djinn_next_step")
    assert (run.layer, run.step) == (2, 3)
    fresh = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(2, 3)])
    assert torch.equal(run.activation(), fresh.activation())
    run.run_to_end()
    with capture_output() as cap:
        back = magic(shell, "djinn_rewind step=1 layer=0")
    assert "rewound from run" in cap.stdout
    assert (back.layer, back.step, back.paused) == (0, 1, True)
    assert shell.magics_manager.registry["DjinnMagics"].run.id == back.id
    hist = magic(shell, f"djinn_history run={run.id}")
    assert isinstance(hist, TokenHistory) and [r["token_id"] for r in hist.records] == run.token_ids
    html = hist._repr_html_()
    assert html.count("class='tok'") == N and "%djinn_rewind step=3" in html and "entropy" in html
    assert str(run.token_ids[0]) in repr(hist)
    with pytest.raises(UsageError, match="needs step="):
        magic(shell, "djinn_rewind layer=0")
    with pytest.raises(UsageError, match="not paused"):
        magic(shell, f"djinn_next_step run={run.id}")
    with pytest.raises(UsageError, match=r"reached steps 0\.\.7, not 9"):
        magic(shell, f"djinn_rewind step=9 run={run.id}")


def test_rewind_magic_with_a_layer_on_a_run_that_never_paused(shell, client):
    run = magic(shell, f"djinn_run max_new_tokens={N} {PROMPT}")
    assert not run.paused
    with capture_output():
        back = magic(shell, f"djinn_rewind step=4 layer=6 run={run.id}")
    assert (back.layer, back.step, back.site, back.paused) == (6, 4, "resid_post", True)
    fresh = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(6, 4)])
    assert torch.equal(back.activation(), fresh.activation())


def test_history_view_orders_colours_by_entropy():
    records = [{"step": 0, "token_id": 1, "token": "a", "topk": [(1, 0.9), (2, 0.1)], "entropy": 0.0},
               {"step": 1, "token_id": 2, "token": "<b>", "topk": [(2, 0.4), (1, 0.3)], "entropy": 2.0}]
    view = TokenHistory(records, prompt="P")
    html = view._repr_html_()
    assert "rgb(255,255,255)" in html and "rgb(255,130,20)" in html  # sure -> white, the most unsure -> orange
    assert ">&lt;b&gt;<span class='card'>" in html and "<b>" not in html  # token text is escaped
    assert view.most_uncertain == 1
    assert TokenHistory([])._repr_html_().count("no tokens") == 1
