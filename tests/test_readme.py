"""The README is a front door that tells the truth: its API block runs as written on the default
model, its links resolve, it stays short, and no product document speaks of how it was made."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_the_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, len(lines)
    heads = [line for line in lines if line.startswith("## ")]
    assert heads[:2] == ["## Quick start", "## The API"] and "## Where next" in heads


def test_the_api_block_runs_as_written():
    import djinn_nb

    code = _blocks(README.read_text(), "python")[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    run, steered, back, grid, cond = (scope[k] for k in ("run", "steered", "back", "grid", "cond"))
    assert isinstance(scope["h"], __import__("torch").Tensor) and steered.done
    assert (run.paused, run.layer, run.step) == (True, 10, 3)  # "on to the next breakpoint (10, 3)"
    assert (back.paused, back.step, back.layer, back.site) == (True, 4, 6, "resid_post")
    assert cond.paused and cond.site == "mlp_out"
    assert scope["branches"].steps == [0, 1, 2] and len(scope["branches"].layers) == scope["client"].info["num_layers"]
    assert grid.shape[0] == scope["client"].info["num_layers"] and 0 < grid.attrs["clean_prob"] <= 1
    for r in (run, steered, back, cond):
        r.close()
    assert isinstance(djinn_nb.connect(), djinn_nb.Client)


def test_the_docs_site_builds_with_warnings_as_errors(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("mkdocs")
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    for name in ("fork_many", "causal_trace", "rewind", "NoTokenizerError", "resolve_texts"):
        assert name in reference, name  # generated from the docstrings


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: {target}"


@pytest.mark.parametrize("page", [README, *DOCS, *sorted((REPO / "experiments" / "results").rglob("*.md"))],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_product_document_speaks_of_sessions(page):
    text = page.read_text()
    found = re.findall(r"(?i)\b(?:this|previous|last|next|second|third) session\b", text)
    assert not found, f"{page.relative_to(REPO)}: {found}"


def test_the_attack_tables_are_the_test_suites():
    """README.md's and docs/server.md's attack tables are written from the tests' ``attack`` marks
    (scripts/attack_table.py), never typed: a new or changed mark makes them stale, and this fails."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("attack_table", REPO / "scripts" / "attack_table.py")
    assert spec is not None and spec.loader is not None
    table = importlib.util.module_from_spec(spec)
    sys.modules["attack_table"] = table  # dataclasses look their module up
    spec.loader.exec_module(table)
    found = table.attacks()
    assert len(found) >= 50 and {a.cls for a in found} == set(table.CLASSES)
    for page in (README, REPO / "docs" / "server.md"):
        text = page.read_text()
        assert text.count("<!-- attacks:") == 2, page.name
        assert table.rewrite(text, found) == text, f"{page.name}: run python scripts/attack_table.py"
    assert f"| all | | {len(found)} | {len(found)} |" in README.read_text()
    shifted = [table.Attack(a.cls, a.tried + " (changed)", a.held, a.test) for a in found]
    assert table.rewrite(README.read_text(), shifted) != README.read_text()  # the check can fail
