"""Execute the notebooks headless with papermill on the embedded default model, on CPU.

Fails on any cell error, and checks that the executed notebooks hold their plots
(image/png outputs) and tables (text/html outputs).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
papermill = pytest.importorskip("papermill")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 600
PARAMS = {"model": None, "device": "cpu", "address": None}
# shorter factor sweeps than the notebooks' defaults, to keep the suite quick on two cores
EXTRA = {
    "02_steering.ipynb": {"factors": [0.0, 0.5, 1.0, 1.5, 2.0]},
    "03_reproduce_exp3.ipynb": {"factors": [0.0, 0.9, 1.0, 2.0]},
}

# notebook -> (least image/png outputs, least text/html outputs)
EXPECTED = {
    "01_quickstart.ipynb": (1, 6),
    "02_steering.ipynb": (2, 4),
    "03_reproduce_exp3.ipynb": (3, 5),
    "04_inside_a_block.ipynb": (5, 5),
    "05_causal_tracing.ipynb": (4, 2),
    "06_control_flow.ipynb": (0, 2),
    "07_features_and_branches.ipynb": (1, 4),
}


def _outputs(nb, mime: str) -> list[str]:
    return [o["data"][mime] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if mime in o.get("data", {})]


def _cells(nb) -> list[tuple[str, str, list[str]]]:
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in nb.cells]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_is_generated_from_its_source(name):
    """Each .ipynb is what jupytext makes of its percent-format .py (``make notebooks``):
    same cells, same sources, same tags; no outputs; one ``parameters`` cell for papermill."""
    jupytext = pytest.importorskip("jupytext")
    source = NOTEBOOKS / name.replace(".ipynb", ".py")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert _cells(nb) == _cells(jupytext.read(source)), f"{name} is out of date: run `make notebooks`"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        f"{name} holds outputs (saved by a Jupyter not started with `make lab`?): `make notebooks` strips "
        f"them, or `git checkout notebooks/{name}`")
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and all(f"{k} =" in tagged[0].source for k in PARAMS)


def _strip_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("strip_notebook_outputs", REPO / "scripts" / "strip_notebook_outputs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _with_outputs(name: str):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.outputs = [nbformat.v4.new_output("stream", text=f"out {i}\n")]
        cell.execution_count = i + 1
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    return nb


def test_outputs_saved_into_a_tracked_notebook_are_stripped_by_make_notebooks(tmp_path):
    """JupyterLab autosaved outputs into notebooks/*.ipynb, after which this suite failed for all six
    and `make notebooks` (jupytext --update keeps outputs) did not repair it."""
    import shutil
    import subprocess
    import sys

    name = "01_quickstart.ipynb"
    work = tmp_path / "notebooks"
    work.mkdir()
    nbformat.write(_with_outputs(name), work / name)
    shutil.copy(NOTEBOOKS / name.replace(".ipynb", ".py"), work)
    out = subprocess.run(["make", "-n", "-B", "notebooks", "PYTHON=python3"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert "strip_notebook_outputs.py notebooks/0*_*.ipynb" in out
    subprocess.run([sys.executable, str(REPO / "scripts" / "strip_notebook_outputs.py"), str(work / name)], check=True)
    stripped = nbformat.read(work / name, as_version=4)
    assert all(c.outputs == [] and c.execution_count is None for c in stripped.cells if c.cell_type == "code")
    assert "widgets" not in stripped.metadata
    assert _cells(stripped) == _cells(nbformat.read(NOTEBOOKS / name, as_version=4))
    assert (work / name).read_bytes() == (NOTEBOOKS / name).read_bytes()  # byte for byte what is tracked


def test_make_lab_saves_the_tracked_notebooks_without_outputs():
    mod = _strip_module()
    for path, stripped in (("notebooks/01_quickstart.ipynb", True), ("notebooks/06_control_flow.ipynb", True),
                           ("notebooks/my_experiment.ipynb", False), ("elsewhere/01_quickstart.ipynb", False)):
        nb = _with_outputs("01_quickstart.ipynb")
        mod.pre_save_hook({"type": "notebook", "content": nb}, path=path, contents_manager=None)
        has = any(c.outputs for c in nb.cells if c.cell_type == "code")
        assert has != stripped, path
    config = (REPO / "scripts" / "lab_config.py").read_text()
    assert "c.FileContentsManager.pre_save_hook = pre_save_hook" in config
    import subprocess

    out = subprocess.run(["make", "-n", "-B", "lab", "PYTHON=python3"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert "jupyter lab --config=scripts/lab_config.py" in out


def test_notebook_sources_are_python_and_leave_sys_path_alone():
    """The sources parse as Python (magics are commented, as jupytext writes them) and no cell
    patches sys.path."""
    for src in sorted(NOTEBOOKS.glob("0*.py")):
        text = src.read_text(encoding="utf-8")
        ast.parse(text, str(src))
        assert "sys.path" not in text, src.name
    assert not (NOTEBOOKS / "make_notebooks.py").exists()


def test_no_cell_after_a_slider_closes_it():
    """Issue 12, item 4: after Run All, the slider the text says to drag is still there."""
    sliders = 0
    for src in sorted(NOTEBOOKS.glob("0*.py")):
        code = [c for c in jupytext_cells(src) if c[0] == "code"]
        made = [i for i, c in enumerate(code) if "%djinn_steer" in c[1] or "SteeringWidget(" in c[1]]
        if made:
            sliders += 1
            assert not any(".close()" in c[1] or "close=all" in c[1] for c in code[made[-1]:]), src.name
    assert sliders >= 2


def jupytext_cells(src: Path) -> list[tuple[str, str, list[str]]]:
    jupytext = pytest.importorskip("jupytext")
    return _cells(jupytext.read(src))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_headless(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the kernel imports this checkout's djinn_nb, whatever an editable install points at
    # (the notebooks themselves never touch sys.path: test_notebook_sources_are_python_...)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    params = {**PARAMS, **EXTRA.get(name, {})}
    if name.startswith("03"):
        params["output_dir"] = str(tmp_path / "exp3")
    out = tmp_path / name
    papermill.execute_notebook(
        str(NOTEBOOKS / name), str(out), parameters=params, kernel_name="python3",
        cwd=str(NOTEBOOKS), execution_timeout=CELL_TIMEOUT_S, progress_bar=False,
    )  # raises PapermillExecutionError on any cell error
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    pngs, htmls = _outputs(nb, "image/png"), _outputs(nb, "text/html")
    least_png, least_html = EXPECTED[name]
    assert len(pngs) >= least_png and all(len(p) > 1000 for p in pngs)
    assert len(htmls) >= least_html and sum("<table" in h for h in htmls) >= least_html - 1
    if name.startswith("03"):
        assert (tmp_path / "exp3" / "djinn_breakpoint_results.json").is_file()
    if name.startswith("01"):
        _check_quickstart(nb, htmls)
    if name.startswith("07"):
        _check_features(nb, htmls)
    if name.startswith("02"):  # the continuations' table (01's lens shows tokens as reprs, '\\n' on purpose)
        tables = [h for h in htmls if "token_change_rate" in h and "djinn-compare" not in h]
        assert tables and not any("\\n" in h for h in tables), "a table shows a literal \\n (issue 12, item 14)"


def _text(nb) -> str:
    return "".join("".join(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _check_quickstart(nb, htmls: list[str]) -> None:
    """Issue 12: 01's steering example changes the output (item 8); `run = %djinn_run` says it paused
    (item 9); no cell after the slider closes it (item 4); the connect cell prints its load time (item 3)."""
    import re

    text = _text(nb)
    assert re.search(r"run r\d+-\w+ paused at layer 10 \(resid_post\), the prompt pass", text)
    m = re.search(r"scale 0\.9 after layer 10: (\d+) of 12 token positions differ", text)
    assert m and int(m.group(1)) > 0, "the default steering example must visibly change the text"
    assert re.search(r"connected to .* \(30 layers\) in \d+\.\d s", text)
    assert any("djinn-compare" in h and "prompt: <b>The capital of France is</b>" in h for h in htmls)


def _check_features(nb, htmls: list[str]) -> None:
    """Issue 24, item 6: the SAE trains in the notebook in well under two minutes and reconstructs its
    training data; the feature condition paused at a decoding step; the clamped branch parts from the
    original (the notebook's own asserts check each against a reference computed in the notebook)."""
    import re

    text = _text(nb)
    m = re.search(r"trained \d+ features on \d+ positions in (\d+\.\d) s", text)
    assert m and float(m.group(1)) < 120, "the SAE must train in the notebook in under two minutes"
    m = re.search(r"explained variance: (\d\.\d+) on the training positions", text)
    assert m and float(m.group(1)) > 0.9
    assert re.search(r"when='feature\(sae\d+, \d+\) > [\d.]+': paused at step [1-9]\d*, layer \d+ resid_pre", text)
    assert re.search(r"divergence at step \d+; at step \d+ the states part at block \d+", text)
    assert sum("<b>SAE sae" in h for h in htmls) >= 2 and any("tokens part at" in h for h in htmls)
