"""``%djinn_features`` and ``%djinn_steer feature=N`` through a real IPython shell, each against the
same call on the client API."""
from __future__ import annotations

import json

import pytest
from IPython.core.error import UsageError

from ipython_shell import djinn_shell, magic
from test_saes import D_SAE, write_sae

from djinn_nb.notebook.feature_magics import FeatureSteeringWidget, FeatureTable

MODEL = "random:gpt2-tiny"
PROMPT = [5, 17, 42, 99, 7]
N = 6
LAYER = 2


@pytest.fixture(scope="module")
def shell():
    with djinn_shell() as sh:
        yield sh


@pytest.fixture
def client(shell, tmp_path):
    c = shell.run_line_magic("djinn_connect", f"model={MODEL}")
    shell.run_line_magic("djinn_break", "clear")
    yield c
    for r in c.runs():
        c.attach(r["id"]).close()
    for s in c.saes():
        c.unload_sae(s)


def test_features_table_equals_the_client_api_with_labels(shell, client, tmp_path):
    write_sae(tmp_path / "s", client.info["hidden_size"], f"blocks.{LAYER}.hook_resid_post", seed=3)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([{"index": i, "description": f"label {i}"} for i in range(D_SAE)]))
    shell.user_ns["res"] = client.load_sae(str(tmp_path / "s"), labels=str(labels))
    magic(shell, f"djinn_break layer={LAYER}")
    run = magic(shell, f"djinn_run max_new_tokens={N} {PROMPT}")
    table = magic(shell, "djinn_features k=4")
    assert isinstance(table, FeatureTable)
    assert list(table.rows) == run.features("sae1", k=4) and len(table.rows) == len(PROMPT)
    f, a = table.rows[1][0]
    assert f"{f} ({a:.3g}) label {f}" in table._repr_html_() and "#17" in repr(table)
    chosen = magic(shell, "djinn_features sae=sae1 ids=3,5")
    assert list(chosen.rows) == run.features("sae1", ids=[3, 5]) and chosen.labels == {}
    with pytest.raises(UsageError, match="no SAE 'nope'"):
        magic(shell, "djinn_features sae=nope")
    run.resume()
    with pytest.raises(UsageError, match="not paused|no SAE reads"):
        magic(shell, "djinn_features")


def test_steer_feature_slider_forks_with_the_clamp(shell, client, tmp_path):
    write_sae(tmp_path / "s", client.info["hidden_size"], f"blocks.{LAYER}.hook_resid_post", seed=3)
    sae = client.load_sae(str(tmp_path / "s"))
    magic(shell, f"djinn_break layer={LAYER}")
    run = magic(shell, f"djinn_run max_new_tokens={N} {PROMPT}")
    top = run.features(sae, k=1)[-1][0][0]
    widget = magic(shell, f"djinn_steer feature={top} min=0 max=60 step=1")
    assert isinstance(widget, FeatureSteeringWidget) and widget.slider.description == f"f{top}"
    result = widget.set(50.0)
    assert result is not None
    assert result.token_ids == run.fork(clamp={top: 50.0}, sae=sae, breakpoints=[]).token_ids
    assert result.token_ids != widget.baseline_ids  # the clamp changes the text: the check can fail
    assert [r["id"] for r in client.runs()].count(run.id) == 1 and run.refresh().paused
    with pytest.raises(UsageError, match=f"feature {D_SAE}"):
        magic(shell, f"djinn_steer feature={D_SAE}")
    scale = magic(shell, "djinn_steer min=0 max=2")  # without feature=: the scale slider
    assert type(scale).__name__ == "SteeringWidget"
