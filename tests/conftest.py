"""Shared fixtures: small random models saved with save_pretrained, and the embedded default."""
from __future__ import annotations

import os

import pytest

import djinn_nb  # noqa: F401 - before torch: idle OpenMP threads wait passively (djinn_nb/core/threads.py)
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory) -> dict[str, str]:
    """Local model directories (no tokenizer) for the architectures the engine supports."""
    from djinn_nb.core.models import build_random

    root = tmp_path_factory.mktemp("models")
    out = {}
    for shape in ("gpt2-tiny", "llama-tiny", "neox-tiny", "qwen2-tiny"):
        path = root / shape
        build_random(shape, seed=7).save_pretrained(path)
        out[shape] = str(path)
    return out


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2 as a plain HF model and tokenizer (the reference side)."""
    from djinn_nb.core.models import load_model

    return load_model(None)


from server_proc import lab  # noqa: E402,F401 - one shared djinn-server process per session (users, TLS, attacks)


@pytest.fixture(scope="session", autouse=True)
def _djinn_home(tmp_path_factory):
    """Every local server the tests (and the notebooks papermill runs) start lives in a private
    directory of this session's, never the user's ~/.cache/djinn_nb, and is stopped at the end."""
    from djinn_nb.serving import localhome

    directory = tmp_path_factory.mktemp("djinn_home")
    old = os.environ.get("DJINN_HOME")
    os.environ["DJINN_HOME"] = str(directory)
    yield directory
    localhome.stop_all(directory)
    if old is None:
        os.environ.pop("DJINN_HOME", None)
    else:
        os.environ["DJINN_HOME"] = old


@pytest.fixture
def local_home(tmp_path, monkeypatch):
    """A directory of this test's own for local servers (``DJINN_HOME``); they are stopped at teardown."""
    from djinn_nb.serving import localhome

    directory = tmp_path / "djinn_home"
    monkeypatch.setenv("DJINN_HOME", str(directory))
    yield directory
    if directory.exists():
        localhome.stop_all(directory)
