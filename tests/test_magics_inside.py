"""The magics for the inside of a block: sites, heads=, the logit lens and attention (issue 9),
driven through a real IPython shell on a tiny random model saved with save_pretrained."""
from __future__ import annotations

import html

import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from ipython_shell import djinn_shell, magic

import djinn_nb
from djinn_nb.notebook.display import Attention, LensGrid

PROMPT = [5, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def shell(saved_models):
    with djinn_shell() as sh:
        sh.run_line_magic("djinn_connect", f"model={saved_models['gpt2-tiny']}")
        yield sh


@pytest.fixture
def client(shell):
    magics = shell.magics_manager.registry["DjinnMagics"]
    c, magics.run = magics.client, None
    shell.run_line_magic("djinn_break", "clear")
    yield c
    for r in c.runs():
        c.attach(r["id"]).close()



def _usage(shell, line: str) -> str:
    with pytest.raises(UsageError) as e:
        magic(shell, line)
    assert "\n" not in str(e.value)
    return str(e.value)


def _html(cap) -> str:
    return "".join(o.data["text/html"] for o in cap.outputs if "text/html" in o.data)


def test_break_at_sites_pauses_there_and_lists_them(shell, client):
    with capture_output() as cap:
        magic(shell, "djinn_break layer=3 site=attn_out")
        magic(shell, "djinn_break layer=3 site=mlp_out")
        magic(shell, "djinn_break layer=3 step=1 site=z")
    assert "layer 3 step 1 z" in cap.stdout and "layer 3 step 0 mlp_out" in cap.stdout
    assert magic(shell, "djinn_break")[0] == {"layer": 3, "step": 0, "site": "attn_out"}
    run = magic(shell, f"djinn_run max_new_tokens=3 {PROMPT}")
    seen = [(run.layer, run.step, run.site)]
    ref = client.generate(PROMPT, max_new_tokens=3, breakpoints=[(3, 0, "attn_out"), (3, 0, "mlp_out"), (3, 1, "z")])
    assert run.activation().equal(ref.activation())
    with capture_output():
        while run.paused:
            magic(shell, "djinn_resume")
            seen.append((run.layer, run.step, run.site) if run.paused else "done")
    assert seen == [(3, 0, "attn_out"), (3, 0, "mlp_out"), (3, 1, "z"), "done"]
    assert run.token_ids == client.generate(PROMPT, max_new_tokens=3).token_ids


def test_unknown_site_names_the_valid_ones(shell, client):
    msg = _usage(shell, "djinn_break layer=3 site=bogus")
    assert "'bogus'" in msg
    for site in client.info["sites"]:
        assert site in msg
    assert magic(shell, "djinn_break") == []  # nothing added
    msg = _usage(shell, "djinn_lens site=z [1, 2]")
    assert "resid_pre, resid_mid, resid_post" in msg


def test_inspect_shows_the_lens_that_run_lens_returns(shell, client):
    magic(shell, "djinn_break layer=4 site=resid_mid")
    run = magic(shell, f"djinn_run max_new_tokens=2 {PROMPT}")
    with capture_output() as cap:
        act = magic(shell, "djinn_inspect lens=3")
    expected = run.lens(3)
    assert act.lens == expected and act.site == "resid_mid"
    shown = html.unescape(act._repr_html_())
    table = act.table()
    for pos, entries in enumerate(expected):
        cell = table["lens (top tokens, probability)"][pos]
        for token_id, prob in entries:
            assert f"'#{token_id}' {prob:.2f}" in cell and f"'#{token_id}' {prob:.2f}" in shown
    assert any("image/png" in o.data for o in cap.outputs)


def test_inspect_away_from_the_residual_stream_says_why_no_lens(shell, client):
    magic(shell, "djinn_break layer=4 site=z")
    run = magic(shell, f"djinn_run max_new_tokens=2 {PROMPT}")
    act = magic(shell, "djinn_inspect plot=false")
    assert act.lens is None and "no logit lens at z" in act.lens_note and "no logit lens at z" in act._repr_html_()
    heads = client.info["num_heads"]
    assert act.tensor.shape == (1, len(PROMPT), heads, client.info["hidden_size"] // heads)
    norms = act.table()["norm"].tolist()  # one row per position, over all heads
    assert norms == pytest.approx(act.tensor[0].flatten(1).norm(dim=-1).tolist())
    with pytest.raises(djinn_nb.errors.BadRequestError):
        run.lens()


@pytest.mark.parametrize("line, kw", [("heads=1 scale=0", dict(heads=[1], scale=0.0)),
                                      ("heads=0,2 scale=2.5", dict(heads=[0, 2], scale=2.5))])
def test_resume_heads_passes_through(shell, client, line, kw):
    magic(shell, "djinn_break layer=2 site=z")
    run = magic(shell, f"djinn_run max_new_tokens=6 {PROMPT}")
    expected = run.fork(breakpoints=[], **kw).token_ids
    with capture_output():
        magic(shell, f"djinn_resume {line}")
    assert run.done and run.token_ids == expected


def test_steer_heads_forks_with_heads(shell, client):
    magic(shell, "djinn_break layer=2")
    magic(shell, f"djinn_run max_new_tokens=6 {PROMPT}")
    # not at z: heads= is refused; with layer=, a new run pauses at z of that layer
    assert "site z" in _usage(shell, "djinn_steer heads=1")
    w = magic(shell, "djinn_steer layer=2 heads=1,3 min=0 max=2 step=0.5")
    try:
        assert (w.run.layer, w.run.site) == (2, "z")
        assert w.set(0.0).token_ids == w.run.fork(heads=[1, 3], scale=0.0, breakpoints=[]).token_ids
    finally:
        w.close()


@pytest.mark.parametrize("setup, line, fix", [
    (["djinn_break layer=2", "djinn_run [1, 2]"], "djinn_resume heads=1 scale=0", "site z"),
    (["djinn_break layer=2 site=z", "djinn_run [1, 2]"], "djinn_resume heads=1", "restricts scale= or add="),
    (["djinn_break layer=2 site=z", "djinn_run [1, 2]"], "djinn_resume heads=9 scale=0", "heads 0..3"),
    (["djinn_break layer=2 site=z", "djinn_run [1, 2]"], "djinn_resume heads=a scale=0", "heads=1,3"),
    (["djinn_break layer=2", "djinn_run [1, 2]"], "djinn_attention head=4", "heads 0..3"),
    ([], "djinn_lens", "no run yet"),
])
def test_mistakes(shell, client, setup, line, fix):
    for s in setup:
        magic(shell, s)
    run = shell.magics_manager.registry["DjinnMagics"].run
    def state() -> dict:  # the version and idle time move on reads too
        return {k: v for k, v in run.refresh().summary.items() if k not in ("v", "idle_s")}

    before = state() if run is not None else None
    assert fix in _usage(shell, line)
    if run is not None:
        assert state() == before  # nothing changed


def test_lens_magic_is_the_client_grid(shell, client):
    with capture_output() as cap:
        grid = magic(shell, f"djinn_lens k=2 {PROMPT}")
    ref = client.lens_grid(PROMPT, k=2)
    assert isinstance(grid, LensGrid) and grid.ids.equal(ref["ids"]) and grid.probs.equal(ref["probs"])
    assert grid.tokens == [f"#{t}" for t in PROMPT]
    assert grid.top_tokens == [[f"#{i}" for i in row] for row in ref["ids"][..., 0].tolist()]
    assert [o for o in cap.outputs if "image/png" in o.data]
    # no prompt: the current run's
    magic(shell, "djinn_break layer=1")
    magic(shell, f"djinn_run max_new_tokens=2 {PROMPT}")
    again = magic(shell, "djinn_lens site=resid_pre plot=false")
    assert again.ids.equal(client.lens_grid(PROMPT, k=1, site="resid_pre")["ids"])


def test_attention_magic_plots_each_head(shell, client):
    heads = client.info["num_heads"]
    magic(shell, "djinn_break layer=3")
    magic(shell, "djinn_break layer=3 step=2")
    run = magic(shell, f"djinn_run max_new_tokens=4 {PROMPT}")
    with capture_output() as cap:
        att = magic(shell, "djinn_attention")
    assert isinstance(att, Attention) and att.tensor.equal(run.attention())
    assert att.tensor.shape == (1, heads, len(PROMPT), len(PROMPT))
    assert att.key_tokens == [f"#{t}" for t in PROMPT]
    assert len([o for o in cap.outputs if "image/png" in o.data]) == 1  # a plain figure: no kernel here
    assert len([ax for ax in att.plot().axes if ax.images]) == heads
    with capture_output():
        magic(shell, "djinn_resume")
        one = magic(shell, "djinn_attention head=1")
    # a decoding step: one query (the new token) over every position so far
    assert one.tensor.shape == (1, heads, 1, len(PROMPT) + 2)
    assert one.key_tokens == [f"#{t}" for t in PROMPT + run.token_ids]
    assert len([ax for ax in one.plot(1).axes if ax.images]) == 1


def test_attention_widget_selects_a_head(shell, client):
    pytest.importorskip("ipywidgets")
    from djinn_nb.notebook.widgets import AttentionWidget

    magic(shell, "djinn_break layer=3")
    run = magic(shell, f"djinn_run max_new_tokens=2 {PROMPT}")
    att = Attention(run.id, 3, 0, run.attention(), [f"#{t}" for t in PROMPT])
    w = AttentionWidget(att, head=2)
    try:
        assert w.head == 2 and len(w.selector.options) == client.info["num_heads"] + 1
        with capture_output() as cap:
            w.show()
            w.selector.value = -1
        assert w.head is None and [o for o in cap.outputs if "image/png" in o.data]
    finally:
        w.close()
