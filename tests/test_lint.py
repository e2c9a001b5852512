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


def test_debug_calls_protocol_matches_the_service():
    """mypy checks DebugCalls against ServiceParts, but cannot check DjinnService against it (its rpyc
    base class has no type information): the protocol's methods must be the service's, same parameters."""
    import inspect

    from djinn_nb.serving.debug_calls import ServiceParts
    from djinn_nb.serving.service import DjinnService

    names = [n for n in vars(ServiceParts) if n.startswith("_") and not n.startswith("__") and n != "_is_protocol"
             and not n.startswith("_abc")]
    assert "_who" in names and "_engine" in names
    for name in names:
        want, got = vars(ServiceParts)[name], inspect.getattr_static(DjinnService, name, None)
        assert got is not None, f"DjinnService has no {name}"
        assert isinstance(got, property) == isinstance(want, property), name
        if not isinstance(want, property):
            assert list(inspect.signature(got).parameters) == list(inspect.signature(want).parameters), name
    assert "_state" in ServiceParts.__annotations__
    assert "self._state = " in inspect.getsource(DjinnService.__init__)
