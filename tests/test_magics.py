"""The magics, driven through a real IPython InteractiveShell with the extension loaded."""
from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from ipython_shell import djinn_shell, magic

import djinn_nb
from djinn_nb.notebook.display import Activation
from djinn_nb.notebook.magics import DjinnMagics

MODEL = "random:gpt2-tiny"
PROMPT = [5, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def shell():
    with djinn_shell() as sh:
        yield sh


@pytest.fixture
def client(shell):
    """A fresh connection to the tiny model, no breakpoints, no current run."""
    c = shell.run_line_magic("djinn_connect", f"model={MODEL}")
    shell.run_line_magic("djinn_break", "clear")
    yield c
    for r in c.runs():
        c.attach(r["id"]).close()



@pytest.mark.parametrize("model", ["random:gpt2-tiny", "random:llama-tiny"])
def test_break_run_inspect_resume_equals_client_api(shell, model):
    client = magic(shell, f"djinn_connect model={model}")
    magic(shell, "djinn_break clear")
    magic(shell, "djinn_break layer=6")
    run = magic(shell, f"djinn_run max_new_tokens=10 {PROMPT}")
    assert isinstance(run, djinn_nb.Run)
    assert (run.paused, run.layer, run.step) == (True, 6, 0)

    with capture_output() as cap:
        act = magic(shell, "djinn_inspect")
    assert isinstance(act, Activation)
    ref = client.generate(PROMPT, max_new_tokens=10, breakpoints=[6])
    assert act.tensor.shape == (1, len(PROMPT), client.info["hidden_size"])
    assert act.tensor.equal(ref.activation())
    assert list(act.table()["token"]) == [f"#{t}" for t in PROMPT]  # no tokenizer: ids
    assert any("image/png" in o.data for o in cap.outputs), "inspect shows a plot"

    with capture_output():
        resumed = magic(shell, "djinn_resume scale=0.9")
    assert resumed is run and run.done
    assert run.token_ids == ref.resume(scale=0.9).token_ids
    run.close()
    ref.close()
    client.close()


def test_text_prompt_on_embedded_model_matches_client(shell):
    """The embedded default, real text: %djinn_run with a text prompt, then resume unmodified."""
    client = magic(shell, "djinn_connect")
    magic(shell, "djinn_break clear")
    magic(shell, "djinn_break layer=6")
    run = magic(shell, "djinn_run max_new_tokens=3 The capital of France is")
    act = magic(shell, "djinn_inspect plot=false")
    assert "".join(act.tokens).strip() == "The capital of France is"
    with capture_output():
        magic(shell, "djinn_resume")
    assert run.text.startswith(" Paris")
    assert run.token_ids == client.generate("The capital of France is", max_new_tokens=3).token_ids
    client.close()


def test_var_expansion_cell_magic_and_dash_options(shell, client):
    shell.user_ns["ids"] = PROMPT
    shell.user_ns["n"] = 4
    magic(shell, "djinn_break --layer 3")
    res = shell.run_cell("r = %djinn_run max_new_tokens={n} {ids}")
    assert res.error_in_exec is None and res.error_before_exec is None
    r = shell.user_ns["r"]
    assert (r.layer, r.summary["max_new_tokens"]) == (3, 4)

    res = shell.run_cell("%%djinn_run --max_new_tokens 2\n[1, 2, 3]\n")
    assert res.error_in_exec is None
    cell_run = res.result
    assert isinstance(cell_run, djinn_nb.Run) and cell_run.prompt_len == 3 and cell_run.paused
    assert magic(shell, "djinn_inspect plot=false").tensor.shape[1] == 3  # the current run is the new one


def test_break_list_steps_and_clear(shell, client):
    assert magic(shell, "djinn_break") == []
    magic(shell, "djinn_break layer=2 step=all")
    magic(shell, "djinn_break 5")
    assert magic(shell, "djinn_break") == [{"layer": 2, "step": "all", "site": "resid_post"},
                                           {"layer": 5, "step": 0, "site": "resid_post"}]
    run = magic(shell, "djinn_run max_new_tokens=3 [1, 2]")
    seen = [(run.layer, run.step)]
    with capture_output():
        while run.paused:
            magic(shell, "djinn_resume")
            seen.append((run.layer, run.step) if run.paused else "done")
    assert seen == [(2, 0), (5, 0), (2, 1), (2, 2), "done"]
    magic(shell, "djinn_break clear")
    assert magic(shell, "djinn_break") == []


def test_resume_with_edit_shows_difference_from_unmodified(shell, client):
    magic(shell, "djinn_break layer=4")
    run = magic(shell, f"djinn_run max_new_tokens=8 {PROMPT}")
    unmodified = client.generate(PROMPT, max_new_tokens=8).token_ids
    with capture_output() as cap:
        magic(shell, "djinn_resume scale=0.0")
    html = [o.data["text/html"] for o in cap.outputs if "text/html" in o.data]
    assert len(html) == 1 and "baseline (unmodified)" in html[0]
    for t in unmodified:
        assert f"#{t}" in html[0]
    assert run.token_ids != unmodified  # zeroing the residual stream changes the output
    # no edit: no comparison is computed or shown
    magic(shell, f"djinn_run max_new_tokens=8 {PROMPT}")
    with capture_output() as cap:
        magic(shell, "djinn_resume")
    assert not [o for o in cap.outputs if "text/html" in o.data]


def test_resume_add_and_activation_from_variables(shell, client):
    import torch

    magic(shell, "djinn_break layer=6")
    run = magic(shell, f"djinn_run max_new_tokens=6 {PROMPT}")
    h = run.activation()
    shell.user_ns["h2"] = h * 1.5
    shell.user_ns["v"] = torch.full((h.shape[-1],), 0.25)
    ref = client.generate(PROMPT, max_new_tokens=6, breakpoints=[6])
    expected_replace = ref.fork(activation=h * 1.5, breakpoints=[]).token_ids
    expected_add = ref.fork(add=torch.full((h.shape[-1],), 0.25), breakpoints=[]).token_ids
    second = magic(shell, "djinn_run max_new_tokens=6 " + str(PROMPT))
    with capture_output():
        assert magic(shell, "djinn_resume activation=h2 compare=false").token_ids == expected_replace
        magic(shell, f"djinn_resume run={run.id} add=v compare=false")
    assert client.attach(run.id).token_ids == expected_add
    assert second.done


def test_steer_magic_returns_a_working_widget(shell, client):
    magic(shell, "djinn_break layer=6")
    run = magic(shell, f"djinn_run max_new_tokens=6 {PROMPT}")
    w = magic(shell, "djinn_steer min=0 max=3 step=0.5")
    try:
        assert (w.slider.min, w.slider.max, w.slider.step, w.slider.continuous_update) == (0, 3, 0.5, False)
        assert w.set(2.5).token_ids == run.fork(scale=2.5, breakpoints=[]).token_ids
        # a different layer starts a new run paused there, from the same prompt
        w2 = magic(shell, "djinn_steer layer=9")
        assert (w2.run.layer, w2.run.id != run.id) == (9, True)
        assert w2.set(0.5).token_ids == client.generate(PROMPT, max_new_tokens=6, breakpoints=[9]).fork(
            scale=0.5, breakpoints=[]
        ).token_ids
        w2.close()
    finally:
        w.close()


def test_runs_lists_reattaches_and_closes(shell, client):
    magic(shell, "djinn_break layer=6")
    run = magic(shell, f"djinn_run max_new_tokens=4 {PROMPT}")
    table = magic(shell, "djinn_runs")
    row = table.frame().set_index("id").loc[run.id]
    assert (row["state"], row["layer"], row["step"]) == ("paused", 6, 0)
    assert row["bytes_held"] > 0
    act = magic(shell, f"djinn_inspect run={run.id} plot=false")  # re-attached by id
    assert act.run_id == run.id
    assert magic(shell, "djinn_runs close=all") == []
    assert client.runs() == []


def test_help_comes_from_docstrings(shell):
    for name in ("djinn_connect", "djinn_break", "djinn_run", "djinn_inspect", "djinn_resume", "djinn_steer",
                 "djinn_lens", "djinn_attention", "djinn_runs"):
        fn = shell.find_line_magic(name)
        assert fn is not None and fn.__doc__ and f"%{name}" in fn.__doc__
    with capture_output() as cap:
        shell.run_cell("%djinn_break?")
    assert "step=0|all" in cap.stdout + "".join(o.data.get("text/plain", "") for o in cap.outputs)


# ----- mistakes: one line, naming the fix ---------------------------------------------
def _usage(shell, line: str) -> str:
    with pytest.raises(UsageError) as e:
        magic(shell, line)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_no_connection(shell):
    m = DjinnMagics(shell)  # a fresh, unconnected instance
    for call in (lambda: m.djinn_run("[1, 2]"), lambda: m.djinn_break("layer=1"), lambda: m.djinn_inspect(""),
                 lambda: m.djinn_runs("")):
        with pytest.raises(UsageError, match="not connected: run %djinn_connect first"):
            call()


@pytest.mark.parametrize(
    "setup, line, fix",
    [
        ([], "djinn_inspect", "no run yet: set a breakpoint with %djinn_break layer=6"),
        ([], "djinn_resume scale=0.9", "%djinn_run <prompt>"),
        (["djinn_run max_new_tokens=2 [1, 2]"], "djinn_inspect", "is done, not paused: set a breakpoint"),
        # issue 12, item 11: on a finished run with a breakpoint already set, no suggestion to set one
        (["djinn_break layer=6", "djinn_run max_new_tokens=2 [1, 2]", "djinn_resume"], "djinn_inspect",
         "is done, not paused: start a new run with %djinn_run <prompt>; it pauses at the breakpoints set (layer 6 step 0"),
        (["djinn_break layer=6", "djinn_run max_new_tokens=2 [1, 2]", "djinn_resume"], "djinn_resume scale=0.5",
         "is done, not paused: start a new run with %djinn_run <prompt>; it pauses at the breakpoints set (layer 6 step 0"),
        ([], "djinn_break layer=12", "use layer=0..11"),
        ([], "djinn_break layer=-1", "use layer=0..11"),
        ([], "djinn_break step=2", "write %djinn_break layer=6"),
        ([], "djinn_break layer=3 step=-2", "step must be >= 0 or 'all'"),
        ([], "djinn_run colour=red [1, 2]", "unknown key 'colour' for %djinn_run: it takes max_new_tokens="),
        ([], "djinn_run max_new_tokens=many [1]", "max_new_tokens must be an integer, e.g. max_new_tokens=6"),
        ([], "djinn_run max_new_tokens=3", "no prompt: write %djinn_run"),
        ([], "djinn_run [1, 2.5]", "a token-id prompt is a list of integers"),
        ([], "djinn_run max_new_tokens=0 [1]", "max_new_tokens must be a positive integer"),  # the server's
        ([], "djinn_run hello there", "pass the prompt as a list of token ids"),  # the server's
        (["djinn_break layer=6", "djinn_run [1, 2]"], "djinn_resume scale=abc", "scale must be a number, e.g. scale=0.9"),
        (["djinn_break layer=6", "djinn_run [1, 2]"], "djinn_resume add=nope", "no variable 'nope' in the notebook"),
        (["djinn_break layer=6", "djinn_run [1, 2]"], "djinn_resume 0.9", "key=value words such as scale=0.9"),
        (["djinn_break layer=6", "djinn_run [1, 2]"], "djinn_steer min=2 max=1", "min must be below max"),
        (["djinn_break layer=6", "djinn_run [1, 2]"], "djinn_steer value=5", "pick a value between them"),
        (["djinn_break layer=6", "djinn_run [1, 2]"], "djinn_steer layer=40", "use layer=0..11"),
        ([], "djinn_inspect run=r999999", "list the runs with %djinn_runs"),
        ([], "djinn_connect 127.0.0.1:1", "could not reach a djinn server at 127.0.0.1:1"),
        ([], "djinn_connect 127.0.0.1:1 model=x", "pass an address or model=..., not both"),
        ([], "djinn_runs close=r999999", "list the runs with %djinn_runs"),
    ],
)
def test_mistakes_raise_one_line_usage_errors(shell, client, setup, line, fix):
    for s in setup:
        magic(shell, s)
    assert fix in _usage(shell, line)


def test_state_survives_a_mistake(shell, client):
    magic(shell, "djinn_break layer=6")
    run = magic(shell, f"djinn_run max_new_tokens=5 {PROMPT}")
    _usage(shell, "djinn_resume scale=nan_value")
    assert run.refresh().paused and run.layer == 6
    with capture_output():
        magic(shell, "djinn_resume")
    assert run.token_ids == client.generate(PROMPT, max_new_tokens=5).token_ids


# ----- argument parsing ------------------------------------------------------------------
def test_parse_options_then_free_text():
    from djinn_nb.notebook import magic_args as A

    spec = dict(n=A.integer, x=A.number, name=A.text, on=A.flag)
    p = A.parse("n=3 --x 0.5 --on name='a b' Hello x=1 world", spec, "m")
    assert p.options == {"n": 3, "x": 0.5, "on": True, "name": "a b"}
    assert p.rest == "Hello x=1 world"  # options lead; what follows is the prompt, verbatim
    assert A.parse("--on false rest", spec, "m").options == {"on": False}
    assert A.parse("n=None name= x=2", spec, "m").options == {"x": 2.0}  # None/empty: not given
    assert A.parse("host:1 n=2", spec, "m", anywhere=True) == A.Parsed({"n": 2}, "host:1")
    assert A.parse_prompt("[1, 2, 3]") == [1, 2, 3]
    assert A.parse_prompt("'Say \"hi\"\\n'") == 'Say "hi"\n'
    assert A.parse_prompt("The x=1 case") == "The x=1 case"
    with pytest.raises(A.ArgError, match="given twice"):
        A.parse("n=1 n=2", spec, "m")
    with pytest.raises(A.ArgError, match="--name needs a value"):
        A.parse("--name", spec, "m")
