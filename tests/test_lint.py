"""ruff, with the small rule set stated in pyproject.toml, passes on the whole tree, and mypy, configured
there too, on the package (make test runs both)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_passes():
    pytest.importorskip("ruff")
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def test_mypy_passes():
    pytest.importorskip("mypy")
    # the [tool.mypy] section of pyproject.toml names the files (djinn_nb) and the settings
    p = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--hide-error-context"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
