"""Loading by hub id without a hub: fail at once with what to do (it retried for ~23 s before),
still load a copy from the hub's cache, and never probe for a local directory."""
from __future__ import annotations

import socket

import pytest

from djinn_nb.core import models
from djinn_nb.errors import BadRequestError


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed: connections are refused at once


@pytest.fixture
def no_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_host", lambda: ("127.0.0.1", closed_port()))
    calls = []

    def from_pretrained(path, **kwargs):
        calls.append((path, kwargs))
        raise OSError("not in the cache")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return calls


def test_a_hub_id_without_a_hub_fails_at_once_saying_what_to_pass(no_hub):
    with pytest.raises(BadRequestError, match=r"no model hub is reachable .*'gpt2' is neither a local directory nor "
                                              r"in the hub's cache: pass a local path"):
        models.load_model("gpt2")
    assert no_hub == [("gpt2", {"dtype": no_hub[0][1]["dtype"], "local_files_only": True})]  # one try, cache only


def test_offline_mode_needs_no_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the hub"))
    assert models._hub_unreachable()


def test_a_reachable_hub_is_seen_as_reachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(models, "_hub_host", lambda: ("127.0.0.1", server.getsockname()[1]))
        assert not models._hub_unreachable()


def test_a_local_directory_never_probes_the_hub(monkeypatch, saved_models):
    monkeypatch.setattr(models, "_hub_unreachable", lambda: pytest.fail("probed the hub for a local path"))
    loaded = models.load_model(saved_models["gpt2-tiny"])
    assert loaded.model.config.n_layer == 12
