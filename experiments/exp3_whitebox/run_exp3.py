"""Experiment 3, white-box breakpoint debugging: steering demo, breakpoint trials (layers x trials),
latency breakdown, token accuracy, concurrent demo, baselines and a comparative report.

    python -m experiments.exp3_whitebox.run_exp3 \\
        --config experiments/exp3_whitebox/configs/cpu_default.yaml --output-dir /tmp/exp3

or by path, as the study wrote it: ``python experiments/exp3_whitebox/run_exp3.py --config ...``
(it then runs itself as the module above, from the repository root).

Writes exp3.log, djinn_breakpoint_results.json, pytorch_eager_results.json,
vllm_results.json and comparative_results.json to the output directory, and
prints the comparative table. ``main(argv)`` is importable (notebooks call it);
``run_experiment(...)`` returns the results as dicts. The JSON schemas are in
this folder's README.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

if __name__ == "__main__" and not __package__:  # run by path: run as the module, which the imports below need
    _repo = str(Path(__file__).resolve().parents[2])
    _env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_repo, os.environ.get("PYTHONPATH")) if p)}
    os.execve(sys.executable, [sys.executable, "-m", "experiments.exp3_whitebox.run_exp3", *sys.argv[1:]], _env)

from .baselines.pytorch_eager_baseline import RESULT_FILE as EAGER_FILE  # noqa: E402 - after the by-path re-run
from .baselines.pytorch_eager_baseline import not_run, run_eager_baseline
from .baselines.vllm_breakpoint_test import RESULT_FILE as VLLM_FILE
from .baselines.vllm_breakpoint_test import run_vllm_test
from .exp3lib import costs, eager, phases, report
from .exp3lib.config import Exp3Config, load_config
from .exp3lib.env import environment, model_dtype, setup_logging, write_json
from .exp3lib.session import Session, open_session, prompt_ids, vocab_size

DJINN_FILE = "djinn_breakpoint_results.json"
COMPARATIVE_FILE = "comparative_results.json"
LOG_FILE = "exp3.log"
log = logging.getLogger("exp3")


def _phase(name: str, errors: dict[str, str], fn: Callable[[], Any]) -> Any:
    """Run one phase; a failure is logged and recorded, and the other phases still run."""
    log.info("== %s", name)
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - one phase's failure must not lose the others' results
        errors[name] = f"{type(e).__name__}: {e}"
        log.error("%s failed: %s\n%s", name, errors[name], traceback.format_exc())
        return None
    log.info("   %s done in %.1f s", name, time.perf_counter() - t0)
    return out


def _setup(session: Session, cfg: Exp3Config, layers: list[int], steer_layer: int, prompt: list[int]) -> dict[str, Any]:
    info = session.client.info
    devices = session.block_devices()
    return {
        "model": info["model"],
        "model_source": cfg.model_source,
        "architecture": info.get("architecture"),
        "num_layers": info["num_layers"],
        "hidden_size": info["hidden_size"],
        "parameters": info.get("parameters"),
        "dtype": info["dtype"],
        "device": info["device"],
        "device_map": cfg.device_map,
        "breakpoint_layers": layers,
        "breakpoint_steps": cfg.breakpoint_steps(),
        "steering_layer": steer_layer,
        "breakpoint_layer_devices": {str(l): devices[l] for l in sorted({*layers, steer_layer})},
        "hf_device_map": getattr(session.model, "hf_device_map", None),
        "prompt_len": len(prompt),
        "prompt_ids": prompt,
        "max_new_tokens": cfg.max_new_tokens,
        "load_and_probe_s": session.load_s,
    }


def _log_summary(djinn: dict[str, Any]) -> None:
    trials = djinn.get("trials") or []
    for layer in (djinn.get("setup") or {}).get("breakpoint_layers", []):
        accs = [t["token_accuracy"] for t in trials if t["layer"] == layer]
        if accs:
            log.info("Token Accuracy layer %d: %s over %d trials", layer, ", ".join(f"{a:.2%}" for a in accs), len(accs))
    s = djinn.get("steering")
    if s:
        log.info("Steering layer %d (%s %s): output changed: %s; token change rate %.2f%%; KL %.3g nats; "
                 "relative logit change %.3g", s["layer"], s["modification_type"], s["modification_factor"],
                 s["output_changed"], 100 * s["token_change_rate"], s["kl_next_token"], s["relative_logit_change"])
    for b in djinn.get("latency_breakdown") or []:
        log.info("Checkpoint: layer %d capture %.3f ms | remaining layers alone %.3f ms | fork engine %.3f ms "
                 "(%.2fx) | fork client %.3f ms (%.2fx, transport %.3f ms)", b["layer"], b["checkpoint_ms"]["median_ms"],
                 b["remaining_layers_alone_ms"]["median_ms"], b["fork_engine_ms"]["median_ms"],
                 b["ratios"]["fork_engine_over_remaining_layers"] or 0, b["fork_client_ms"]["median_ms"],
                 b["ratios"]["fork_client_over_remaining_layers"] or 0, b["transport_ms"] or 0)
    a = djinn.get("armed_overhead")
    if a:
        log.info("Overhead: breakpoint at layer %d every step, auto-resumed: engine %+.2f%%, client %+.2f%%",
                 a["layer"], a["engine_overhead_pct"], a["client_overhead_pct"])


def _run_phases(
    session: Session, cfg: Exp3Config, errors: dict[str, str], skip_pytorch: bool, skip_vllm: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Every phase on a loaded session; returns the djinn, PyTorch-baseline and vLLM results."""
    engine = session.engine
    num_layers = engine.num_layers
    layers = cfg.resolve_layers(num_layers)
    steer_layer = cfg.resolve_steering_layer(layers, num_layers)
    prompt = prompt_ids(cfg, engine.tokenizer, vocab_size(session.model))
    setup = _setup(session, cfg, layers, steer_layer, prompt)
    log.info("model %s: %d layers on %s; breakpoints at layers %s (devices %s), prompt of %d tokens",
             setup["model"], num_layers, setup["device"], layers, setup["breakpoint_layer_devices"], len(prompt))
    baseline_run = session.client.generate(prompt, cfg.max_new_tokens)
    baseline = baseline_run.token_ids
    baseline_run.close()
    plain = eager.greedy(session.model, engine.anatomy, prompt, cfg.max_new_tokens)
    djinn: dict[str, Any] = {
        "setup": setup,
        "unpaused_token_ids": baseline,
        "unpaused_equals_plain_pytorch": baseline == plain.token_ids,
    }
    if cfg.steering.enabled:
        djinn["steering"] = _phase("steering demo", errors, lambda: phases.steering_demo(session, cfg, prompt, steer_layer, baseline))
    djinn["trials"] = _phase("breakpoint trials", errors, lambda: phases.breakpoint_trials(session, cfg, prompt, layers, baseline, plain.token_ids))
    djinn["latency_breakdown"] = [
        b for b in (
            _phase(f"latency breakdown layer {l}", errors, lambda l=l: costs.latency_breakdown(session, prompt, l, cfg.timing))
            for l in layers if l != num_layers - 1
        ) if b is not None
    ]
    if steer_layer not in layers and steer_layer != num_layers - 1:
        b = _phase("latency breakdown steering layer", errors, lambda: costs.latency_breakdown(session, prompt, steer_layer, cfg.timing))
        if b:
            djinn["latency_breakdown"].append(b)
    djinn["armed_overhead"] = _phase("armed vs plain generation", errors, lambda: costs.armed_overhead(session, prompt, steer_layer, cfg.max_new_tokens, cfg.timing))
    if cfg.concurrent_demo:
        djinn["concurrent"] = _phase("concurrent demo", errors, lambda: phases.concurrent_demo(session, cfg, prompt, steer_layer, baseline))
    trials = djinn.get("trials") or []
    djinn["token_accuracy_all_100pct"] = bool(trials) and all(t["token_accuracy"] == 1.0 for t in trials)
    if skip_pytorch:
        eager_res = not_run("skipped (--skip-pytorch)")
    else:
        eager_res = _phase("PyTorch eager baseline", errors, lambda: run_eager_baseline(session.model, engine.anatomy, prompt, cfg, layers, steer_layer)) \
            or not_run(f"failed: {errors.get('PyTorch eager baseline')}")
    if djinn.get("steering") and eager_res.get("steering"):
        djinn["steering_matches_eager_hook"] = djinn["steering"]["steered_token_ids"] == eager_res["steering"]["steered_token_ids"]
    if skip_vllm:
        vllm_res = {"run": False, "reason": "skipped (--skip-vllm)", "reason_short": "skipped (--skip-vllm)"}
    else:
        vllm_res = _phase("vLLM baseline", errors, lambda: run_vllm_test(cfg, prompt, session.model)) or {"run": False, "reason": errors.get("vLLM baseline")}
    return djinn, eager_res, vllm_res


def run_experiment(
    cfg: Exp3Config, output_dir: str | Path, skip_pytorch: bool = False, skip_vllm: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run every phase and write the five result files; returns {file stem: result dict}.
    ``quiet``: only warnings and errors on stderr (the log file has everything)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out / LOG_FILE, console=not quiet)
    env = environment(cfg.device, model_dtype(cfg.dtype, cfg.device, cfg.model_source))
    log.info("exp3: %s (%s) on %s [%s]; config %s", cfg.model_name, cfg.model_source, cfg.device, env["device_name"], cfg.path)
    errors: dict[str, str] = {}
    djinn: dict[str, Any] = {"setup": None}
    eager_res: dict[str, Any] = not_run("the experiment stopped before the baseline")
    vllm_res: dict[str, Any] = {"run": False, "reason": "the experiment stopped before the baseline", "reason_short": "not reached"}
    try:
        session = open_session(cfg)
    except Exception as e:  # noqa: BLE001 - still write the five files, saying why
        errors["setup"] = f"{type(e).__name__}: {e}"
        log.error("loading %s failed: %s\n%s", cfg.model_source, errors["setup"], traceback.format_exc())
        session = None
    if session is not None:
        try:
            djinn, eager_res, vllm_res = _run_phases(session, cfg, errors, skip_pytorch, skip_vllm)
        except Exception as e:  # noqa: BLE001 - a failure outside any phase (setup of the prompt, say)
            errors["setup"] = f"{type(e).__name__}: {e}"
            log.error("experiment failed: %s\n%s", errors["setup"], traceback.format_exc())
        finally:
            session.close()
    djinn.setdefault("token_accuracy_all_100pct", False)
    djinn["errors"] = errors
    rows = report.comparative_rows(djinn, eager_res, vllm_res)
    table = report.format_table(rows)
    comparative = {
        "columns": list(report.COLUMNS),
        "rows": rows,
        "table_text": table,
        "goals": report.goals(djinn),
        "study_reference": {"label": report.STUDY_LABEL, "source": report.STUDY_SOURCE, "values": report.STUDY_REFERENCE},
        "vllm_reason": vllm_res.get("reason"),
        "token_accuracy_all_100pct": djinn["token_accuracy_all_100pct"],
        "steering_output_changed": (djinn.get("steering") or {}).get("output_changed"),
        "errors": errors,
    }
    common = {"config": cfg.as_dict(), "environment": env}
    results = {"djinn": djinn, "pytorch_eager": eager_res, "vllm": vllm_res, "comparative": comparative}
    for name, fname in (("djinn", DJINN_FILE), ("pytorch_eager", EAGER_FILE), ("vllm", VLLM_FILE), ("comparative", COMPARATIVE_FILE)):
        write_json(out / fname, {**results[name], **common})
    _log_summary(djinn)
    log.debug("\n%s", table)  # the file gets it; the terminal gets it once, from main()
    if vllm_res.get("reason"):
        log.info("vLLM: %s", vllm_res["reason"])
    log.info("goals: %s", comparative["goals"])
    log.info("results in %s", out)
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    p.add_argument("--output-dir", default=None, help="where the result files go (default: the config's output_dir)")
    p.add_argument("--skip-pytorch", action="store_true", help="do not run the plain PyTorch baseline")
    p.add_argument("--skip-vllm", action="store_true", help="do not run the vLLM baseline")
    p.add_argument("--device", default=None, help="override the config's device (cpu, cuda:0)")
    p.add_argument("--model", default=None, help="override model.source: hub id, directory, embedded, random:<shape>")
    p.add_argument("--dtype", default=None, help="override model.dtype (float32, bfloat16, float16)")
    p.add_argument("--device-map", default=None, help="'auto': split the model over the visible GPUs (accelerate)")
    p.add_argument("--quiet", action="store_true",
                   help="only warnings and errors on stderr; the progress log is in OUTPUT_DIR/exp3.log")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry; exit 0 when every phase ran and token accuracy was 100%, else 1."""
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, device=args.device, model_source=args.model, dtype=args.dtype, device_map=args.device_map)
    output_dir = args.output_dir or cfg.output_dir
    if not output_dir:
        print("run_exp3: give --output-dir (the config names none)", file=sys.stderr)
        return 2
    results = run_experiment(cfg, output_dir, args.skip_pytorch, args.skip_vllm, quiet=args.quiet)
    comp = results["comparative"]
    print(comp["table_text"])
    return 0 if comp["token_accuracy_all_100pct"] and not comp["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
