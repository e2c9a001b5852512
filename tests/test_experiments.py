"""Every result a benchmark writes says what it was measured with: device name, commit and dtype
(a README figure was labelled fp32 that had been measured in bf16, and the fork benchmark recorded no dtype)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from experiments.exp3_whitebox.exp3lib.env import environment, model_dtype, write_json

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _calls(name: str):
    for path in sorted(EXPERIMENTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == name:
                yield path, node


def test_every_environment_names_the_dtype_it_measured():
    calls = list(_calls("environment"))
    assert len(calls) >= 20
    for path, node in calls:
        assert len(node.args) + len(node.keywords) == 2, f"{path.name}:{node.lineno} passes no dtype"


def test_results_are_written_only_through_write_json():
    for path in sorted(EXPERIMENTS.rglob("*.py")):
        if path.name == "env.py":  # write_json itself
            continue
        text = path.read_text()
        assert "write_text(json.dumps" not in text and "json.dump(" not in text, path.name


def test_a_result_without_device_commit_or_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"missing \['device_name', 'git_commit', 'dtype'\]"):
        write_json(tmp_path / "x.json", {"median_ms": 1.0})
    env = environment("cpu", "float32")
    assert env["dtype"] == "float32" and env["device_name"].startswith("CPU") and "git_commit" in env
    write_json(tmp_path / "ok.json", {"median_ms": 1.0, "environment": env})
    del env["dtype"]
    with pytest.raises(ValueError, match=r"missing \['dtype'\]"):
        write_json(tmp_path / "y.json", {"environment": env})


@pytest.mark.parametrize("dtype, device, model, want", [
    (None, "cuda:0", "random:gpt2", "bfloat16"),  # what the mislabelled figure ran in
    (None, "cpu", "random:gpt2", "float32"),
    ("float32", "cuda:0", "random:gpt2", "float32"),
    (None, "cuda:0", None, "float32"),  # the embedded default loads in fp32 anywhere
    ("auto", "cuda:0", "embedded", "bfloat16"),
])
def test_the_dtype_recorded_is_the_one_the_model_loads_in(dtype, device, model, want):
    assert model_dtype(dtype, device, model) == want


def test_the_results_index_is_current_and_every_readme_result_has_its_file():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, str(EXPERIMENTS.parent / "scripts" / "results_index.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_the_causal_trace_benchmark_runs_and_its_three_grids_agree(tmp_path):
    """A smoke run of experiments/bench/causal_trace.py on the tiny model: it must start its server,
    time the three ways, and find the grids equal to the per-cell hook loop's."""
    import json

    from experiments.bench import causal_trace

    assert causal_trace.main(["--model", "random:gpt2-tiny", "--device", "cpu", "--dtype", "float32",
                              "--positions", "4", "--trace-repeats", "1", "--out", str(tmp_path)]) == 0
    out = json.loads(next(tmp_path.glob("causal_trace_*.json")).read_text())
    assert set(out["trace"]["ms"]) >= {"djinn_causal_trace", "torch_hooks_batched_per_layer"}
    assert max(out["trace"]["max_abs_diff_vs_hooks"].values()) < 1e-6


def test_the_top_level_of_experiments_holds_no_script():
    """The benchmarks are experiments/bench/ (one per figure), the one-off investigations
    experiments/probes/, what benchmarks and tests share experiments/harness/; a ``bench_*.py`` (or
    any other module) back at the top level makes experiments/ a pile again."""
    stray = sorted(p.name for p in EXPERIMENTS.glob("*.py") if p.name != "__init__.py")
    assert not [n for n in stray if n.startswith("bench_")], f"move these to experiments/bench/ without the bench_ prefix: {stray}"
    assert not stray, f"experiments/ top level: move these to bench/, probes/ or harness/: {stray}"
    assert not list((EXPERIMENTS / "bench").glob("bench_*.py")), "experiments/bench/ names its scripts without the bench_ prefix"


SCRIPTS = sorted(p.stem for d in ("bench", "probes") for p in (EXPERIMENTS / d).glob("*.py")
                 if p.stem != "__init__" and "def main(" in p.read_text())


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_and_probe_imports_and_parses_its_options(name, capsys):
    """Each script still imports from where it sits (its relative imports) and answers ``--help``
    through ``main(argv)``, as ``python -m experiments.<bench|probes>.<name> --help`` does."""
    import importlib

    package = "bench" if (EXPERIMENTS / "bench" / f"{name}.py").exists() else "probes"
    module = importlib.import_module(f"experiments.{package}.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out
