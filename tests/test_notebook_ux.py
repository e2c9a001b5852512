"""Issue 12: the rough edges a new user met between `git clone` and steering in JupyterLab.

One test (or more) per item; the live-slider items are also driven in a real browser
(tests/browser/). Models: the random GPT-2 (no tokenizer) where tokens don't matter.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import torch

import djinn_nb
from djinn_nb.notebook import display as D
from djinn_nb.notebook import plots
from djinn_nb.notebook.compare import Comparison, align, changed_count, compare_html
from djinn_nb.notebook.widgets import SteeringWidget, effect_svg, forks_at

REPO = Path(__file__).resolve().parents[1]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else None
PROMPT = [11, 22, 33, 44, 55, 66]


@pytest.fixture(scope="module")
def client():
    c = djinn_nb.connect(model="random:gpt2-tiny")
    yield c
    c.close()


@pytest.fixture
def shell(client):
    """The process's IPython shell (as tests/test_magics.py uses it) with the extension, on ``client``."""
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "djinn_nb")
    m = ip.magics_manager.registry["DjinnMagics"]
    saved = (m.client, m.breakpoints, m.run, m.widgets)
    m.client, m.breakpoints, m.run, m.widgets = client, [], None, []
    yield ip
    for w in m.widgets:
        w.close()
    m.client, m.breakpoints, m.run, m.widgets = saved


def _magic(shell, line: str):
    name, _, rest = line.partition(" ")
    return shell.run_line_magic(name, rest)


# ----- item 1: one command to a notebook -------------------------------------------------
def test_make_lab_installs_jupyterlab_registers_a_kernel_and_opens_notebook_01():
    out = subprocess.run(["make", "-n", "-B", "lab", "PYTHON=python3"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert re.search(r'pip install -q -c constraints\.txt -e "\.\[notebook,lab\]"', out)
    assert "ipykernel install --sys-prefix --name djinn_nb" in out
    assert re.search(r"jupyter lab --config=scripts/lab_config\.py --ip=127\.0\.0\.1 .*--ServerApp\.root_dir=.*notebooks/01_quickstart\.ipynb", out, re.S)
    assert re.search(r"echo \"JupyterLab with notebook 01: http://127\.0\.0\.1:8888/lab/tree/notebooks/01_quickstart\.ipynb\?token=", out)
    cfg = (REPO / "setup.cfg").read_text()
    lab = cfg.split("lab =")[1].split("dev =")[0]
    assert "jupyterlab" in lab
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quick start")[1].split("\n## ")[0]
    assert all(f"make {t}" in quick for t in ("demo", "test", "lab"))


def test_install_pins_the_tested_versions_and_says_how_to_try_newer_ones():
    out = subprocess.run(["make", "-n", "-B", "install", "PYTHON=python3"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert re.search(r'pip install -q -c constraints\.txt -e "\.\[notebook,dev\]"', out)
    pins = {name.lower().replace("_", "-"): version
            for name, version in (line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                                  if line and not line.startswith("#"))}
    for name in ("transformers", "tokenizers", "rpyc", "jupyterlab", "playwright", "pytest", "huggingface-hub"):
        assert name in pins, name
    assert "torch" not in pins  # installed apart, by scripts/install-torch
    import importlib.metadata

    for name in ("transformers", "tokenizers", "rpyc"):  # the tests run with what is pinned
        assert importlib.metadata.version(name) == pins[name], name
    readme = (REPO / "README.md").read_text()
    assert "constraints.txt" in readme and "CONSTRAINTS=/dev/null" in readme


# ----- item 2: CPU-only torch on any Linux -------------------------------------------------
def _install_torch(env: dict[str, str]) -> str:
    import sys

    return subprocess.run([str(REPO / "scripts" / "install-torch"), sys.executable], cwd=REPO, text=True,
                          capture_output=True, check=True, env={**os.environ, "DRY_RUN": "1", **env}).stdout


def test_install_torch_prefers_a_local_cpu_wheel_then_the_cpu_index_then_plain_pip(tmp_path):
    no_local = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(tmp_path), "PIP_NO_INDEX": "1"}
    with socket.socket() as server:  # something that answers where PyTorch's CPU index would be
        server.bind(("127.0.0.1", 0))
        server.listen()
        index = f"http://127.0.0.1:{server.getsockname()[1]}/whl/cpu"
        out = _install_torch({**no_local, "TORCH_CPU_INDEX": index})
    assert f"would run: {os.sys.executable} -m pip install -q torch --index-url {index}" in out
    out = _install_torch({**no_local, "TORCH_CPU_INDEX": "http://127.0.0.1:9/whl/cpu"})  # nothing listens
    assert "is not reachable" in out and out.strip().endswith("pip install -q torch")
    assert _install_torch({"TORCH": "torch"}).strip().endswith("pip install -q torch")  # a CUDA build, asked for
    # a +cpu wheel in a find-links folder (this machine kind has one; link it, pip reads its metadata)
    wheels = [w for d in os.environ.get("PIP_FIND_LINKS", "").split() if os.path.isdir(d)
              for w in Path(d).glob("torch-*+cpu-*.whl")]
    if wheels:
        (tmp_path / wheels[0].name).symlink_to(wheels[0])
        version = wheels[0].name.split("-")[1]
        out = _install_torch({"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(tmp_path)})
        assert f"the local CPU wheel {version}" in out and out.strip().endswith(f"torch=={version}")


# ----- item 3: the first load says what it is and how long it took ------------------------
def test_connect_says_what_loads_and_how_long_it_took(shell, capsys):
    m = shell.magics_manager.registry["DjinnMagics"]
    old = m.client
    m.client = None  # so %djinn_connect does not close the module's client
    try:
        _magic(shell, "djinn_connect model=random:gpt2-tiny")
        out = capsys.readouterr().out
        assert "connecting to the local server of random:gpt2-tiny on cpu: the first connect starts it" in out
        assert re.search(r"connected to random:gpt2-tiny \(2 layers\) in \d+\.\d s", out) or \
            re.search(r"connected to .* in \d+\.\d s", out)
    finally:
        m.client.close()
        m.client = old


# ----- items 4 and 5: the slider's busy state, its plot, one summary ----------------------
def test_slider_dims_the_old_text_while_a_fork_computes_and_shows_one_summary(client):
    run = client.generate(PROMPT, max_new_tokens=8, breakpoints=[1])
    w = SteeringWidget(client, run, min=0, max=3, step=0.25)
    gate, started = threading.Event(), threading.Event()
    real = run.fork_many  # what the slider forks with (widgets.forks_at)

    def slow(*a, **k):
        started.set()
        gate.wait(30)
        return real(*a, **k)

    try:
        run.fork_many = slow
        w.slider.value = 0.0
        assert started.wait(30)
        busy = w.output.value
        assert "computing scale 0" in busy and "opacity:0.4" in busy and "djinn-busy" in busy
        assert "computing scale 0" in w.status.value
        gate.set()
        result = w.wait()
        del run.fork_many
        page = w.output.value + w.status.value
        assert "djinn-busy" not in page and "opacity:0.4" not in page
        assert len(re.findall(r"\d+ of \d+ tokens changed", page)) == 1, "the summary appears once"
        assert f"{result.comparison.changed} of {result.comparison.total} tokens changed" in page
        assert "showing scale 0" in w.status.value
        w.set(2.0)
        svg = re.search(r"<svg class='djinn-effect'.*?</svg>", w.output.value).group(0)
        assert svg.count("<circle") == 2 and "scale 2: " in svg and "r='4'" in svg  # the current one is big
    finally:
        w.close()
        run.close()


def test_effect_plot_places_points_by_factor_and_share_changed():
    svg = effect_svg({0.0: 1.0, 1.0: 0.0, 2.0: 0.5}, 2.0, 0.0, 2.0)
    xs = [float(x) for x in re.findall(r"<circle cx='([\d.]+)'", svg)]
    ys = [float(y) for y in re.findall(r"cy='([\d.]+)'", svg)]
    assert xs == sorted(xs) and ys[0] < ys[2] < ys[1]  # 100 % highest on the page, 0 % lowest


def test_forks_at_uses_fork_many_when_the_run_has_it(client):
    run = client.generate(PROMPT, max_new_tokens=6, breakpoints=[1])
    try:
        singles = forks_at(run, [0.5, 2.0], breakpoints=[])
        expected = [f.token_ids for f in singles]
        for f in singles:
            f.close()
        calls = []

        def fork_many(edits):
            calls.append(edits)
            return [run.fork(**e) for e in edits]

        run.fork_many = fork_many
        batched = forks_at(run, [0.5, 2.0], breakpoints=[], heads=None)
        assert calls == [[{"scale": 0.5, "breakpoints": []}, {"scale": 2.0, "breakpoints": []}]]
        assert [f.token_ids for f in batched] == expected
        for f in batched:
            f.close()
    finally:
        run.close()


# ----- item 6: a slider on a resumed run disables itself ----------------------------------
def test_resuming_the_slider_run_disables_the_slider_with_the_reason(shell, client, capsys):
    _magic(shell, "djinn_break layer=1")
    _magic(shell, "djinn_run max_new_tokens=4 [1, 2, 3]")
    w = _magic(shell, "djinn_steer")
    _magic(shell, "djinn_resume")
    assert w.slider.disabled and "slider disabled: run" in w.status.value and "is done" in w.status.value
    w.slider.value = 0.5  # a move after that forks nothing and prints nothing
    assert w.wait() is None and w.results == []
    assert "failed" not in capsys.readouterr().out


# ----- item 7: aligned, left-aligned, with the prompt --------------------------------------
def test_comparison_aligns_by_tokens_marks_insertions_and_shows_the_prompt():
    base, other = [1, 2, 3, 4, 5], [9, 1, 2, 3, 4, 5]  # the same text one token later
    assert [o.kind for o in align(base, other)] == ["insert", "equal"]
    assert changed_count(align(base, other)) == (1, 6)
    page = compare_html(list("abcde"), base, list("Xabcde"), other, "scale 2", prompt="<p>")
    assert re.findall(r"<span style='background:#ffe08a[^']*'[^>]*>([^<]*)</span>", page) == ["X"]
    assert "1 of 6 tokens changed (1 inserted)" in page and "prompt: <b>&lt;p&gt;</b>" in page
    for th in re.findall(r"<th style='([^']*)'", page):
        assert "text-align:left" in th
    dropped = compare_html(list("abcde"), base, list("acde"), [1, 3, 4, 5], "x")
    assert re.findall(r"<span style='background:#f8c9c9[^']*'[^>]*>([^<]*)</span>", dropped) == ["b"]
    assert "1 of 5 tokens changed (1 deleted)" in dropped
    c = Comparison(base, list("abcde"), other, list("Xabcde"), "scale 2", prompt="p")
    assert c.changed == 1 and repr(c).startswith("prompt: 'p'\n")


# ----- item 9: `r = %djinn_run` says it paused --------------------------------------------
def test_run_magic_prints_where_it_paused(shell, capsys):
    _magic(shell, "djinn_break layer=1")
    capsys.readouterr()
    shell.run_cell("r = %djinn_run max_new_tokens=4 [1, 2, 3]")
    out = capsys.readouterr().out
    run = shell.user_ns["r"]
    assert f"run {run.id} paused at layer 1 (resid_post), the prompt pass; 0 tokens so far." in out
    assert "Next: %djinn_inspect, %djinn_steer, %djinn_resume" in out


# ----- item 10: %djinn_runs writes bytes and missing values as the run card does ----------
def test_runs_table_formats_bytes_and_missing_values_once(shell, client):
    _magic(shell, "djinn_break layer=1")
    run = _magic(shell, "djinn_run max_new_tokens=4 [1, 2, 3]")
    done = client.generate([1, 2], max_new_tokens=2)
    table = _magic(shell, "djinn_runs")
    page, text = table._repr_html_(), repr(table)
    for s in (page, text):
        assert D.format_bytes(run.bytes_held) in s
        assert not re.search(r"<NA>|NaN|None|nan", s)
    rows = {r[0]: r for r in D.runs_rows(table)}
    assert rows[done.id][2] == "-" and rows[run.id][5] == D.format_bytes(run.bytes_held)
    assert "bytes held" in page and str(run.bytes_held) not in page.replace(D.format_bytes(run.bytes_held), "")
    assert table.frame().set_index("id").loc[run.id, "bytes_held"] == run.bytes_held  # raw values on demand
    done.close()
    _magic(shell, "djinn_runs close=all")


# ----- item 12: a terminal IPython shows text, not object reprs ---------------------------
def test_figures_and_widgets_in_a_text_only_front_end(client, capsys):
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    saved = ip.display_formatter.active_types
    ip.display_formatter.active_types = ["text/plain"]  # what TerminalInteractiveShell sets
    try:
        plots.show(plots.plot_activation(torch.ones(1, 3, 4), title="t"))
    finally:
        ip.display_formatter.active_types = saved
    out = capsys.readouterr().out
    assert out.startswith("[figure: t;") and "IPython.core.display.Image" not in out
    assert plots.shows_images()  # a Jupyter-like front end gets the image
    run = client.generate(PROMPT, max_new_tokens=4, breakpoints=[1])
    w = SteeringWidget(client, run)
    try:
        bundle = w._repr_mimebundle_()
        assert bundle["text/plain"].startswith("<djinn SteeringWidget on run") and "VBox" not in bundle["text/plain"]
    finally:
        w.close()
        run.close()


# ----- item 13: an attention sink does not flatten the norms ------------------------------
def test_norm_plot_goes_log_when_one_position_dwarfs_the_others():
    t = torch.ones(1, 6, 8)
    t[0, 0] *= 100.0  # position 0: an attention sink, 100x the others
    fig = plots.plot_activation(t)
    assert fig.axes[0].get_yscale() == "log" and "log" in fig.axes[0].get_ylabel()
    assert plots.plot_activation(torch.ones(1, 6, 8)).axes[0].get_yscale() == "linear"
    assert plots.plot_activation(t, log=False).axes[0].get_yscale() == "linear"


# ----- item 14: the small ones -------------------------------------------------------------
def test_paused_card_has_no_empty_text_row_and_table_has_one_position(client):
    from djinn_nb.notebook.formatters import run_card

    run = client.generate(PROMPT, max_new_tokens=4, breakpoints=[1])
    try:
        assert ">text<" not in run_card(run)  # nothing generated yet in the prompt pass
        run.resume()
        assert ">text<" in run_card(run)
    finally:
        run.close()
    stats = {"shape": [1, 2, 2], "dtype": "float32", "norm": 1, "mean": 0, "std": 0, "min": 0, "max": 1,
             "position_norm": [1.0, 2.0], "position_mean": [0.0, 0.0], "position_max": [1.0, 2.0]}
    table = D.activation_table(stats, ["a", "b"])
    assert table.index.name == "position" and "position" not in table.columns
    assert D.activation_html(stats, ["a", "b"]).count(">position<") == 1


def test_notebooks_carry_the_language_info_a_kernel_reports():
    """JupyterLab writes the kernel's language_info into the notebook on opening: if it differs,
    the notebook is marked modified at once. (The browser test checks the real thing.)"""
    import json
    import sys

    for p in sorted((REPO / "notebooks").glob("0*.ipynb")):
        info = json.loads(p.read_text())["metadata"]["language_info"]
        assert info["pygments_lexer"] == "ipython3" and info["codemirror_mode"] == {"name": "ipython", "version": 3}
        assert info["version"].count(".") == 2, p.name
        if os.environ.get("DJINN_BROWSER_TEST") == "required":  # CI: the notebooks match this Python
            assert info["version"] == sys.version.split()[0], p.name


# ----- "what to build" 4: hover on a token shows its top-k alternatives -------------------
def test_slider_tokens_carry_their_top_k_alternatives(client):
    """The alternatives are the server's top-k of each step (``run.history()``), whether or not the
    run records logits: they match the recorded logits' softmax, and show without them too."""
    run = client.generate(PROMPT, max_new_tokens=5, breakpoints=[1], record_logits=True)
    w = SteeringWidget(client, run, top_k=3)
    try:
        result = w.set(0.5)
        alts = result.comparison.alternatives
        with run.fork(scale=0.5, breakpoints=[]) as f:
            for step, tok in enumerate(f.token_ids):
                probs, ids = torch.softmax(f.logits(step).float(), -1).topk(3)
                assert [p for _, p in alts[step]] == pytest.approx(probs.tolist())
                assert [t for t, _ in alts[step]] == D.token_strings(client, ids.tolist())
                assert alts[step][0][0] == D.token_strings(client, [tok])[0]  # greedy: the top one was chosen
        titles = re.findall(r"title='([^']*)'", w.output.value)
        assert sum("top: " in t for t in titles) == 5  # one per generated token
    finally:
        w.close()
        run.close()
    plain = client.generate(PROMPT, max_new_tokens=5, breakpoints=[1])  # no logits recorded
    w = SteeringWidget(client, plain, top_k=3)
    try:
        assert w.set(0.5).comparison.alternatives == alts and "top: " in w.output.value
    finally:
        w.close()
        plain.close()
