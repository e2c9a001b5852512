"""The exp3 experiment end to end on a tiny random model on CPU (what CI can run), plus its metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXP = Path(__file__).resolve().parents[1] / "experiments" / "exp3_whitebox"
FILES = ("exp3.log", "djinn_breakpoint_results.json", "pytorch_eager_results.json", "vllm_results.json", "comparative_results.json")
sys.path.insert(0, str(EXP))

from exp3lib.config import ConfigError, parse_config  # noqa: E402
from exp3lib.metrics import kl_divergence, relative_logit_change, steering_effect, token_accuracy  # noqa: E402


@pytest.fixture(scope="module")
def exp3_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("exp3")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(EXP / "run_exp3.py"), "--config", str(EXP / "configs" / "ci_tiny.yaml"), "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    return out, proc


def _load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def test_run_exp3_writes_all_files_and_exits_zero(exp3_run):
    out, proc = exp3_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in FILES:
        assert (out / name).is_file(), name
    assert "token accuracy" in proc.stdout and "study (A100/H100, their setup)" in proc.stdout


def test_token_accuracy_is_100pct_for_every_layer_and_trial(exp3_run):
    out, _ = exp3_run
    djinn = _load(out, "djinn_breakpoint_results.json")
    trials = djinn["trials"]
    layers = djinn["setup"]["breakpoint_layers"]
    assert {t["layer"] for t in trials} == set(layers) and len(trials) == len(layers) * 2
    for t in trials:
        assert t["token_accuracy"] == 1.0, t
        assert t["pauses"] == djinn["setup"]["max_new_tokens"]  # steps: all -> one pause per step
    assert djinn["token_accuracy_all_100pct"] is True
    assert djinn["unpaused_equals_plain_pytorch"] is True


def test_steering_states_whether_output_changed(exp3_run):
    out, _ = exp3_run
    djinn = _load(out, "djinn_breakpoint_results.json")
    s = djinn["steering"]
    assert isinstance(s["output_changed"], bool)
    assert s["kl_next_token"] >= 0 and s["relative_logit_change"] > 0
    assert s["original_resumed_equals_unpaused_run"] and s["unmodified_fork_equals_unpaused_run"]
    assert djinn["steering_matches_eager_hook"] is True
    assert isinstance(_load(out, "comparative_results.json")["steering_output_changed"], bool)


def test_results_record_environment_and_baselines(exp3_run):
    out, _ = exp3_run
    for name in FILES[1:]:
        env = _load(out, name)["environment"]
        for key in ("torch", "transformers", "python", "djinn_nb", "device_name", "timestamp_utc"):
            assert env[key], (name, key)
    vllm = _load(out, "vllm_results.json")
    assert vllm["run"] in (True, False) and (vllm["run"] or vllm["reason"])
    assert vllm["api_capabilities"]["pause_mid_forward_at_a_decoder_block"]["supported"] is False
    breakdown = _load(out, "djinn_breakpoint_results.json")["latency_breakdown"]
    assert breakdown and all(b["fork_logits_equal_remaining_layers_logits"] for b in breakdown)
    assert _load(out, "pytorch_eager_results.json")["run"] is True


def test_metrics():
    assert token_accuracy([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_accuracy([1, 2], [1, 2, 3]) == pytest.approx(2 / 3)
    a = torch.tensor([1.0, 2.0, 3.0])
    assert kl_divergence(a, a) == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence(a, a.flip(0)) > 0
    assert relative_logit_change(a, a * 1.1) == pytest.approx(0.1)
    eff = steering_effect([1, 2, 3], [1, 5, 3], a, a)
    assert eff["output_changed"] and eff["token_change_rate"] == pytest.approx(1 / 3) and eff["first_changed_position"] == 1


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.name"):
        parse_config({"model": {}})
    with pytest.raises(ConfigError, match="modification_type"):
        parse_config({"model": {"name": "x"}, "experiment": {"activation_steering": {"modification_type": "rotate"}}})
    cfg = parse_config({"model": {"name": "x"}, "experiment": {"breakpoints": {"fractions": [0.25, 0.5, 0.75]}}})
    assert cfg.resolve_layers(12) == [3, 6, 9] and cfg.resolve_layers(30) == [7, 15, 22]
