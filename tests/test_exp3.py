"""The exp3 experiment end to end on a tiny random model on CPU (what CI can run), its metrics,
and its config: the study's own file runs as written, and a misspelt key is an error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from djinn_nb.notebook import metrics as nb_metrics
from experiments.exp3_whitebox.exp3lib.config import ConfigError, load_config, parse_config
from experiments.exp3_whitebox.exp3lib.metrics import (
    kl_divergence, relative_logit_change, steering_effect, token_accuracy,
)

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "experiments" / "exp3_whitebox"
FILES = ("exp3.log", "djinn_breakpoint_results.json", "pytorch_eager_results.json", "vllm_results.json", "comparative_results.json")
MODULE = "experiments.exp3_whitebox.run_exp3"


def run_exp3(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m experiments.exp3_whitebox.run_exp3 ARGS`` from the repository root."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", MODULE, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def exp3_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Run by path, as the study wrote it (it failed: "attempted relative import with no known parent
    package"), from another folder, quietly, as notebook 03 runs it."""
    out = tmp_path_factory.mktemp("exp3")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return out, subprocess.run([sys.executable, str(EXP / "run_exp3.py"), "--config", str(EXP / "configs" / "ci_tiny.yaml"),
                                "--output-dir", str(out), "--quiet"], capture_output=True, text=True, timeout=300,
                               env=env, cwd=out)


def test_quiet_leaves_stderr_to_warnings_and_the_log_has_the_progress(exp3_run):
    out, proc = exp3_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = [line for line in proc.stderr.splitlines() if line.strip() and "%|" not in line]  # progress bars stay
    assert len(noise) <= 3, noise  # notebook 03 showed a wall of pink stderr
    log = (out / "exp3.log").read_text()
    assert "== latency breakdown layer" in log and "done in" in log
    assert "token accuracy" in proc.stdout.lower()  # the comparative table still prints


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
        for key in ("torch", "transformers", "python", "djinn_nb", "device_name", "timestamp_utc", "dtype", "git_commit"):
            assert env[key], (name, key)
    vllm = _load(out, "vllm_results.json")
    assert vllm["run"] in (True, False) and (vllm["run"] or vllm["reason"])
    assert vllm["api_capabilities"]["pause_mid_forward_at_a_decoder_block"]["supported"] is False
    breakdown = _load(out, "djinn_breakpoint_results.json")["latency_breakdown"]
    assert breakdown and all(b["fork_logits_equal_remaining_layers_logits"] for b in breakdown)
    assert _load(out, "pytorch_eager_results.json")["run"] is True


def test_the_latency_breakdown_has_server_parts_that_add_up_to_the_total(exp3_run):
    """All of a fork's time was reported as transport (server parts 0.0): the forks' timings were
    read after they were closed."""
    out, _ = exp3_run
    for b in _load(out, "djinn_breakpoint_results.json")["latency_breakdown"]:
        parts = b["fork_client_parts_mean_ms"]
        assert parts["fork_copy_ms"] > 0 and parts["execute_ms"] > 0 and parts["transport_ms"] > 0
        assert parts["fork_copy_ms"] + parts["execute_ms"] + parts["transport_ms"] == pytest.approx(parts["total_ms"])
        assert b["fork_client_server_parts_ms"]["execute_ms"] > 0
        assert b["transport_ms"] < b["fork_client_ms"]["median_ms"]


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


def test_exp3_metrics_are_the_packages():
    """The experiment reports the notebook layer's steering measures, not a drifted copy."""
    a, b = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 1.0, 3.0])
    assert kl_divergence(a, b) == nb_metrics.kl_divergence(a, b) > 0
    assert relative_logit_change(a, b) == nb_metrics.relative_logit_change(a, b)
    assert kl_divergence(a, a + 5.0) == 0.0  # a shift leaves the distribution; rounding is clamped at 0
    assert token_accuracy([1, 2], []) == 0.0 and token_accuracy([], []) == 1.0


# The study's config as its README gives it (shared/seed/exp3_whitebox_debugging.md, "Edit
# configs/exp3_osdi_full.yaml"), byte for byte; only "gpt2" is replaced by a saved model directory.
SEED_YAML = '''model:
  name: "gpt2"              # GPT-2 (proven steering works)
  source: "transformers"

experiment:
  breakpoints:
    layers: [3, 6, 9]       # Early, mid, late layers
  
  activation_steering:
    enabled: true           # Steering demo enabled
    steering_layer: 6       # Mid-point for modification
    modification_factor: 0.9  # Scale activation by 0.9

  concurrent_demo:
    enabled: true           # Multi-request demo
'''
SEED_DOC = Path("/work/shared/seed/exp3_whitebox_debugging.md")


@pytest.mark.skipif(not SEED_DOC.is_file(), reason="the seed study is not on this machine")
def test_seed_yaml_is_the_studys_text():
    assert f"```yaml\n{SEED_YAML}```" in SEED_DOC.read_text(encoding="utf-8")


def test_seed_config_runs_as_written(tmp_path, saved_models):
    """The study's file, with its model a saved random GPT-2 (12 layers: its layers 3, 6, 9 exist),
    loads that model with transformers and runs every phase at 100 % token accuracy."""
    model_dir = saved_models["gpt2-tiny"]
    cfg_path = tmp_path / "exp3_osdi_full.yaml"
    cfg_path.write_text(SEED_YAML.replace('"gpt2"', json.dumps(model_dir), 1), encoding="utf-8")
    cfg = load_config(cfg_path)
    assert cfg.model_source == model_dir and cfg.resolve_layers(12) == [3, 6, 9]
    out = tmp_path / "out"
    proc = run_exp3("--config", str(cfg_path), "--output-dir", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    djinn = _load(out, "djinn_breakpoint_results.json")
    assert djinn["errors"] == {}
    assert djinn["setup"]["model"] == model_dir and djinn["setup"]["breakpoint_layers"] == [3, 6, 9]
    assert djinn["setup"]["steering_layer"] == 6
    assert len(djinn["trials"]) == 3 * 3 and all(t["token_accuracy"] == 1.0 for t in djinn["trials"])
    assert djinn["steering"]["modification_factor"] == 0.9 and djinn["concurrent"]


def test_source_transformers_or_missing_loads_the_named_model():
    for source in ("transformers", "huggingface", "HuggingFace"):
        assert parse_config({"model": {"name": "/some/dir", "source": source}}).model_source == "/some/dir"
    # no source: the model the config names, not the embedded default
    assert parse_config({"model": {"name": "gpt2"}}).model_source == "gpt2"
    assert parse_config({"model": {"name": "label", "source": "random:gpt2-tiny"}}).model_source == "random:gpt2-tiny"
    with pytest.raises(ConfigError, match="source: 'random:gpt2'"):
        parse_config({"model": {"name": "random:gpt2", "source": "transformers"}})


@pytest.mark.parametrize("raw, key, near", [
    ({"model": {"name": "x"}, "experiment": {"num_trails": 5}}, "experiment.num_trails", "experiment.num_trials"),
    ({"model": {"name": "x", "sorce": "transformers"}}, "model.sorce", "model.source"),
    ({"model": {"name": "x"}, "experiment": {"activation_steering": {"steering_layr": 6}}},
     "experiment.activation_steering.steering_layr", "experiment.activation_steering.steering_layer"),
    ({"model": {"name": "x"}, "timings": {}}, "timings", "timing"),
])
def test_unknown_key_is_an_error_naming_it_and_the_nearest(raw, key, near):
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert f"'{key}'" in str(e.value) and f"did you mean '{near}'" in str(e.value)


def test_misspelt_key_fails_the_run(tmp_path):
    """Through the CLI: a misspelt num_trials stops run_exp3 with the key's name, before any work."""
    cfg_path = tmp_path / "typo.yaml"
    cfg_path.write_text((EXP / "configs" / "ci_tiny.yaml").read_text().replace("num_trials:", "num_trails:"))
    proc = run_exp3("--config", str(cfg_path), "--output-dir", str(tmp_path / "out"), timeout=120)
    assert proc.returncode != 0
    assert "unknown config key 'experiment.num_trails': did you mean 'experiment.num_trials'?" in proc.stderr
    assert not (tmp_path / "out").exists()
