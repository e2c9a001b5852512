"""Notebooks 01 and 02 in JupyterLab, driven by a real headless Chromium (Playwright).

Starts JupyterLab from this venv on loopback (a random token, its config, runtime,
settings and workspaces in a temporary folder; the notebooks copied there so the
checkout is never written), opens each notebook, checks it is not marked modified
on opening, runs all cells and checks that no cell output is an error. In 01 it
drags the steering slider and types a value into it, and checks that the text the
slider shows is exactly ``run.fork(scale=v).text`` for the value the slider shows,
computed here through the client API on the same model. Screenshots go to
``tests/browser/artifacts/`` (gitignored).

Needs Debian's ``chromium`` (``apt-get install chromium``; Playwright is pointed at it,
its own browser download is never used), ``playwright`` and ``jupyterlab`` (the ``dev``
extra). Without them the test is skipped with the reason; with
``DJINN_BROWSER_TEST=required`` (``.ci/run``) it fails instead.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = os.environ.get("DJINN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# Limits are ratios of a yardstick measured beside them, under the same load: one 12-token generate
# of the default model through the client (0.6-0.8 s on an idle 2-core machine; several seconds with
# two busy processes beside it, where a fixed 120 s limit failed).
RUN_ALL_LIMIT = 40  # notebook 01's Run All, in yardsticks (measured: ~13 s, ~16 yardsticks, idle)
RUN_ALL_TIMEOUT = 1000  # how long to wait for any notebook's Run All (02's sweep is the long one)
FORK_TIMEOUT = 150  # one slider move
# notebook 01's parameters, which the expected texts below are computed with
PROMPT, LAYER, MAX_NEW_TOKENS = "The capital of France is", 10, 12


def _missing() -> str | None:
    if CHROMIUM is None:
        return "no chromium on PATH (apt-get install -y chromium; or DJINN_CHROMIUM=/path)"
    for mod in ("playwright", "jupyterlab"):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is not installed (pip install -e '.[dev]')"
    return None


def _require() -> None:
    why = _missing()
    if why is None:
        return
    if os.environ.get("DJINN_BROWSER_TEST") == "required":
        pytest.fail(f"the browser test is required here but cannot run: {why}")
    pytest.skip(f"browser test not run: {why}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    _require()
    root = tmp_path_factory.mktemp("lab")
    work = root / "notebooks"
    shutil.copytree(REPO / "notebooks", work, ignore=shutil.ignore_patterns("*.py", ".ipynb_checkpoints"))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JUPYTER_CONFIG_DIR": str(root / "config"),
           "JUPYTER_RUNTIME_DIR": str(root / "runtime"), "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
           f"--LabApp.user_settings_dir={root / 'settings'}", f"--LabApp.workspaces_dir={root / 'workspaces'}",
           "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers run as root
        cmd.append("--allow-root")
    log = open(root / "lab.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                json.load(r)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("JupyterLab did not start: " + (root / "lab.log").read_text(errors="replace")[-3000:])
            time.sleep(0.5)
    yield {"base": base, "token": token, "work": work}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def expected_client():
    """The same default model in this process: the reference texts come from the client API."""
    import djinn_nb

    c = djinn_nb.connect()
    yield c
    c.close()


@pytest.fixture(scope="module")
def yardstick(expected_client) -> float:
    """Seconds of one 12-token generate of the default model, now (the median of three)."""
    expected_client.generate(PROMPT, max_new_tokens=MAX_NEW_TOKENS).close()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        expected_client.generate(PROMPT, max_new_tokens=MAX_NEW_TOKENS).close()
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[1]
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "yardstick_seconds.txt").write_text(f"{seconds:.3f}\n")
    return seconds


def _open(browser, lab, name: str):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    # a workspace of its own, reset: Lab would otherwise reopen the earlier tests' notebooks beside
    # this one (their kernels starting too), and which of them is current would depend on timing
    workspace = name.replace(".ipynb", "").replace("_", "-")
    page.goto(f"{lab['base']}/lab/workspaces/{workspace}/tree/{name}?reset&token={lab['token']}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                           timeout=120_000)
    return page


_NB = "window.jupyterapp.shell.currentWidget"


def _run_all(page, yardstick: float) -> None:
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); return true; }")
    # done when every code cell has an execution count and the kernel is idle, or a cell failed
    # (Run All stops there: the cells after it never run, so waiting for them would only time out)
    page.wait_for_function(
        f"""() => {{
            const nb = {_NB}; const cells = nb.content.model.cells;
            let pending = false;
            for (let i = 0; i < cells.length; i++) {{
                const c = cells.get(i);
                if (c.type !== 'code') continue;
                if ((c.toJSON().outputs || []).some(o => o.output_type === 'error')) return true;
                if (!c.executionCount) pending = true;
            }}
            return !pending && nb.sessionContext.session.kernel.status === 'idle';
        }}""", timeout=max(600, RUN_ALL_TIMEOUT * yardstick) * 1000, polling=1000)


def _errors(page) -> list[str]:
    return page.evaluate(f"""() => {{
        const cells = {_NB}.content.model.cells; const out = [];
        for (let i = 0; i < cells.length; i++) {{
            const c = cells.get(i);
            if (c.type !== 'code') continue;
            for (const o of c.toJSON().outputs || [])
                if (o.output_type === 'error') out.push(`cell ${{i}}: ${{o.ename}}: ${{o.evalue}}`);
        }}
        return out;
    }}""")


def _dirty(page) -> bool:
    return page.evaluate(f"() => {_NB}.context.model.dirty")


def _check_not_modified_on_open(page, name: str) -> None:
    """Issue 12, item 14. Lab writes the kernel's language_info into the notebook when it connects;
    the notebooks carry this machine kind's (Python 3.11.7), so elsewhere the check says nothing."""
    info = json.loads((REPO / "notebooks" / name).read_text())["metadata"]["language_info"]
    if info["version"] != sys.version.split()[0]:
        return
    page.wait_for_timeout(2000)  # let Lab write back whatever it would on opening
    assert not _dirty(page), f"{name} is marked modified as soon as it is opened"


def _slider_state(page) -> dict:
    """The last steering slider's readout, the fork text it shows and its status line."""
    return page.evaluate(f"""() => {{
        const nb = document.getElementById({_NB}.id);
        const sliders = nb.querySelectorAll('.widget-slider');
        const s = sliders[sliders.length - 1];
        const box = s.closest('.widget-vbox');
        const shown = box.querySelector('.djinn-compare');
        const cells = shown ? shown.querySelectorAll('td pre') : [];
        const titles = cells.length === 2 ? [...cells[1].querySelectorAll('span[title]')].map(e => e.title) : [];
        return {{readout: s.querySelector('.widget-readout').textContent.trim(), titles: titles,
                 busy: !!box.querySelector('.djinn-busy'),
                 text: cells.length === 2 ? cells[1].textContent : null,
                 label: shown ? shown.querySelectorAll('th')[1].textContent : null,
                 status: box.querySelector('.djinn-status') ? box.querySelector('.djinn-status').textContent : '',
                 disabled: !!s.querySelector('.noUi-target[disabled]') || !!s.querySelector('[disabled]')}};
    }}""")


def _settled(page, scale: float, yardstick: float) -> dict:
    """Wait until the slider shows the fork of ``scale`` (not busy, its status says so)."""
    want = f"showing scale {scale:.3g}"
    page.wait_for_function(
        f"""() => {{
            const nb = document.getElementById({_NB}.id);
            const sliders = nb.querySelectorAll('.widget-slider');
            const box = sliders[sliders.length - 1].closest('.widget-vbox');
            const status = box.querySelector('.djinn-status');
            return !box.querySelector('.djinn-busy') && status && status.textContent.endsWith({want!r});
        }}""", timeout=max(60, FORK_TIMEOUT * yardstick) * 1000, polling=250)
    return _slider_state(page)


def _fork_text(client, scale: float) -> str:
    run = client.generate(PROMPT, max_new_tokens=MAX_NEW_TOKENS, breakpoints=[LAYER])
    try:
        with run.fork(scale=scale, breakpoints=[]) as f:
            return f.text
    finally:
        run.close()


def test_quickstart_runs_and_the_slider_shows_the_forks_text(browser, lab, expected_client, yardstick):
    page = _open(browser, lab, "01_quickstart.ipynb")
    try:
        _check_not_modified_on_open(page, "01_quickstart.ipynb")
        t0 = time.monotonic()
        _run_all(page, yardstick)
        seconds = time.monotonic() - t0
        (ARTIFACTS / "01_run_all_seconds.txt").write_text(f"{seconds:.1f} s = {seconds / yardstick:.1f} yardsticks\n")
        print(f"notebook 01, Run All in JupyterLab: {seconds:.1f} s ({seconds / yardstick:.1f} x {yardstick:.2f} s)")
        # a reader sees pause, inspect, steering and resume in about a minute on an idle 2-core machine
        assert seconds < RUN_ALL_LIMIT * yardstick, (
            f"Run All of notebook 01 took {seconds:.0f} s = {seconds / yardstick:.0f} x a 12-token generate "
            f"({yardstick:.2f} s now); the limit is {RUN_ALL_LIMIT}x")
        page.screenshot(path=str(ARTIFACTS / "01_after_run_all.png"), full_page=True)
        assert _errors(page) == []
        state = _settled(page, 0.9, yardstick)  # the last cell moved the slider to 0.9 from code
        assert state["readout"] == "0.90" and not state["disabled"]
        assert state["text"] == _fork_text(expected_client, 0.9)
        assert state["titles"] and all(t.startswith("top: ") or "top: " in t for t in state["titles"])

        handle = page.locator(f"#{page.evaluate(f'() => {_NB}.id')} .widget-slider .noUi-handle").last
        handle.scroll_into_view_if_needed()
        box = handle.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] - 25, box["y"] + box["height"] / 2, steps=8)
        page.mouse.up()
        dragged = float(_slider_state(page)["readout"])
        state = _settled(page, dragged, yardstick)
        assert dragged < 0.9 and state["label"] == f"scale {dragged:.3g}"
        assert state["text"] == _fork_text(expected_client, dragged), f"slider at {dragged}"
        page.screenshot(path=str(ARTIFACTS / "01_slider_dragged.png"), full_page=True)

        readout = page.locator(f"#{page.evaluate(f'() => {_NB}.id')} .widget-slider .widget-readout").last
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type("1.5")
        page.keyboard.press("Enter")
        page.wait_for_function(
            f"() => [...document.getElementById({_NB}.id).querySelectorAll('.widget-slider .widget-readout')]"
            ".pop().textContent.trim() === '1.50'", timeout=10_000)
        state = _settled(page, 1.5, yardstick)
        assert state["label"] == "scale 1.5" and state["text"] == _fork_text(expected_client, 1.5)
        page.screenshot(path=str(ARTIFACTS / "01_slider_typed.png"), full_page=True)

        # resuming the slider's run (as a person would, in a new cell) disables the slider, saying why
        page.evaluate(f"() => {{ {_NB}.sessionContext.session.kernel.requestExecute({{code: '%djinn_resume'}}); return true; }}")
        page.wait_for_function(
            f"""() => {{
                const nb = document.getElementById({_NB}.id);
                const sliders = nb.querySelectorAll('.widget-slider');
                const box = sliders[sliders.length - 1].closest('.widget-vbox');
                const status = box.querySelector('.djinn-status');
                return status && status.textContent.startsWith('slider disabled: run');
            }}""", timeout=60_000, polling=250)
        assert _slider_state(page)["disabled"]
        page.screenshot(path=str(ARTIFACTS / "01_slider_disabled.png"), full_page=True)
    finally:
        page.close()


def test_steering_notebook_runs_without_errors(browser, lab, yardstick):
    page = _open(browser, lab, "02_steering.ipynb")
    try:
        _check_not_modified_on_open(page, "02_steering.ipynb")
        _run_all(page, yardstick)
        page.screenshot(path=str(ARTIFACTS / "02_after_run_all.png"), full_page=True)
        assert _errors(page) == []
    finally:
        page.close()


_VIEWS = '''import pandas as pd
import djinn_nb
from djinn_nb.notebook.history import TokenHistory

words = [" The", " capital", "\\n", " of", " France", " is", " Paris", ".", "\\n", " It", " is", " big"]
records = [{"step": i, "token_id": 100 + i, "token": w, "entropy": 0.1 * (i % 5),
            "topk": [(100 + i, 0.5), (7, 0.2), (8, 0.15), (9, 0.1), (10, 0.05)],
            "topk_tokens": [w, " a", " b", " c", " d"]} for i, w in enumerate(words)]
TokenHistory(records, prompt="Hello")
'''
_TRACE = '''frame = pd.DataFrame([[0.1, 0.6, 0.2], [0.3, 0.2, 0.1]], index=pd.Index([0, 1], name="layer"),
                     columns=["0: The", "1:  Eiffel", "2:  Tower"])
frame.attrs.update(clean_prob=0.7015, corrupt_prob=0.0001, answer=7042, answer_text=" Paris", site="mlp_out")
djinn_nb.plot_causal_trace(frame)
'''


def test_the_token_history_card_and_the_causal_trace_plot_as_a_reader_sees_them(browser, lab, yardstick):
    """The hover card of a token on the last line was clipped by the output area (3 of 5 alternatives,
    never the %djinn_rewind line); newline tokens had no width; plot_causal_trace as a cell's last line
    drew the figure twice."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(_VIEWS), nbformat.v4.new_code_cell(_TRACE)]
    nb.metadata = json.loads((REPO / "notebooks" / "01_quickstart.ipynb").read_text())["metadata"]  # its kernel
    nbformat.write(nb, lab["work"] / "views.ipynb")
    page = _open(browser, lab, "views.ipynb")
    try:
        _run_all(page, yardstick)
        assert _errors(page) == []
        root = f"document.getElementById({_NB}.id)"
        widths = page.evaluate(f"() => [...{root}.querySelectorAll('.djinn-hist .tok')].map("
                               "t => [t.firstChild.textContent, t.getBoundingClientRect().width])")
        assert len(widths) == 12 and all(w > 0 for _, w in widths), widths
        assert [t for t, _ in widths].count("⏎") == 2
        last = page.locator(".djinn-hist .tok").last
        last.scroll_into_view_if_needed()
        last.hover()
        card = page.evaluate(f"""() => {{
            const toks = {root}.querySelectorAll('.djinn-hist .tok');
            const card = toks[toks.length - 1].querySelector('.card');
            const area = card.closest('.jp-OutputArea-output');
            const c = card.getBoundingClientRect(), a = area.getBoundingClientRect();
            // what a reader sees at the card's last line: the card itself, unless something clips it
            const seen = document.elementFromPoint(c.left + 8, c.bottom - 6);
            return {{shown: getComputedStyle(card).display, text: card.textContent, cardBottom: c.bottom,
                     areaBottom: a.bottom, topmost: !!seen && card.contains(seen)}};
        }}""")
        page.screenshot(path=str(ARTIFACTS / "history_hover_card.png"), full_page=True)
        assert card["shown"] == "block" and "%djinn_rewind step=11" in card["text"]
        assert card["cardBottom"] <= card["areaBottom"] + 1, card  # inside the output area, not clipped
        assert card["topmost"], card
        images = page.evaluate(f"""() => {{
            const cells = {_NB}.content.model.cells; const c = cells.get(1).toJSON();
            return (c.outputs || []).filter(o => o.data && o.data['image/png']).length;
        }}""")
        assert images == 1  # drawn once
        page.locator(".jp-OutputArea-output img").last.screenshot(path=str(ARTIFACTS / "causal_trace_plot.png"))
    finally:
        page.close()
