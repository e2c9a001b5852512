"""Requests that made the server allocate in proportion to what they listed, not what they need: a run
listed 4096 times in token_probs (+1.57 GB on the embedded model), 8 MB of text to tokenize (+1.08 GB).
Each case runs in a fresh process, whose peak memory it reads."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import djinn_nb
from djinn_nb.errors import BadRequestError

PEAK = """
import json, resource, sys
import djinn_nb
client = djinn_nb.connect()
run = client.generate("The capital of France is", max_new_tokens=1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
{body}
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("PEAK", json.dumps({{"grown_mb": (after - before) / 1024, "out": out}}))
"""


def peak_growth(body: str) -> dict:
    p = subprocess.run([sys.executable, "-c", PEAK.format(body=body)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.split("PEAK ", 1)[1])


@pytest.mark.attack(cls="admission", tried="token_probs of one run listed 4,096 times", held="read once")
def test_a_run_listed_many_times_is_read_once():
    got = peak_growth("ps = client.token_probs([run] * 4096, 7042)\nout = [len(ps), len(set(ps))]")
    assert got["out"] == [4096, 1]
    assert got["grown_mb"] < 200, got  # was ~1,600 MB: 4096 x 49152 floats, twice


@pytest.mark.attack(cls="admission", tried="8 MB of text to tokenize", held="refused before tokenizing")
def test_a_text_longer_than_the_model_could_take_is_refused_before_tokenizing():
    got = peak_growth("""
try:
    client.tokenize("word " * 1_600_000)
    out = "tokenized"
except djinn_nb.DjinnError as e:
    out = str(e)
""")
    assert got["out"].startswith("a text of 8000000 characters is longer than this model could take (524288: 64 per position")
    assert got["grown_mb"] < 100, got  # was ~1,080 MB


@pytest.fixture(scope="module")
def client():
    return djinn_nb.connect()


def test_token_probs_of_distinct_and_repeated_runs_keep_their_order(client):
    a = client.generate("The capital of France is", max_new_tokens=1)
    b = client.generate("The Eiffel Tower is in", max_new_tokens=1)
    pa, pb = client.token_probs([a], 7042)[0], client.token_probs([b], 7042)[0]
    assert client.token_probs([b, a, b, a], 7042) == [pb, pa, pb, pa]
    import torch

    assert pa == pytest.approx(torch.softmax(a.logits().float(), -1)[7042].item(), rel=1e-6)
    for r in (a, b):
        r.close()


def test_generate_with_too_long_a_text_says_so_and_starts_nothing(client):
    count = len(client.runs())
    with pytest.raises(BadRequestError, match="longer than this model could take"):
        client.generate("x" * (client.info["max_positions"] * 64 + 1), max_new_tokens=1)
    assert len(client.runs()) == count


@pytest.mark.attack(cls="admission", tried="a lens_grid over a long prompt (layers x positions x vocabulary)", held="only the top-k of each layer kept")
def test_the_lens_grid_of_a_long_prompt_keeps_only_the_top_k_of_each_layer():
    """layers x positions x vocabulary logits at once: 6.8 GB of peak memory here for 600 positions, before."""
    got = peak_growth("""
grid = client.lens_grid(list(range(100, 700)), k=2)
out = list(grid["ids"].shape)
""")
    assert got["out"] == [30, 600, 2]
    assert got["grown_mb"] < 1500, got  # measured 260-930 MB after (6,800 MB before)


def test_the_lens_grid_equals_the_lens_at_a_pause_at_each_layer(client):
    import torch

    prompt = [100, 2000, 31, 7, 4000, 512, 9]
    grid = client.lens_grid(prompt, k=3)
    for layer in (0, 14, 29):
        run = client.generate(prompt, max_new_tokens=1, breakpoints=[layer])
        lens = run.lens(k=3)
        assert grid["ids"][layer].tolist() == [[i for i, _ in row] for row in lens]
        assert torch.equal(grid["probs"][layer], torch.tensor([[p for _, p in row] for row in lens], dtype=grid["probs"].dtype))
        run.close()
