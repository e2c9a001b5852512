"""Baseline: the same trials in plain PyTorch, one process, forward hooks, no djinn_nb.

A ``Trace`` on block N keeps a reference to its output at every step (the
"checkpoint" of an in-process debugger that never returns control), steering is
the package reference's hook (``djinn_nb.core.reference.edit_at``) editing block
N's output on the prompt pass, and the "restore" lower bound is the remaining
layers run alone from a block input captured with ``Trace(stop=True, keep_inputs=True)``. This is the cheapest any
breakpoint system can be on this model: djinn_nb's costs are read against it.

    python -m experiments.exp3_whitebox.baselines.pytorch_eager_baseline \\
        --config experiments/exp3_whitebox/configs/cpu_default.yaml --output-dir /tmp/x
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from djinn_nb.core.pause import Trace

from ..exp3lib import eager
from ..exp3lib.config import Exp3Config, load_config
from ..exp3lib.env import environment, model_dtype, write_json
from ..exp3lib.metrics import steering_effect, token_accuracy
from ..exp3lib.timing import measure, ratio, stats, sync

RESULT_FILE = "pytorch_eager_results.json"


def _timed_generation(model: Any, anatomy: Any, prompt: list[int], n: int, block: Any | None) -> tuple[list[int], float]:
    """Greedy generation, timed; with ``block``, a Trace keeps the block's output at every step."""
    store: list = []
    with contextlib.ExitStack() as stack:
        if block is not None:
            stack.enter_context(Trace(block, on_value=lambda h: store.append(h.detach())))
        sync()
        t0 = time.perf_counter()
        ids = eager.greedy(model, anatomy, prompt, n).token_ids
        sync()
        return ids, (time.perf_counter() - t0) * 1e3


def _hook_overhead(model: Any, anatomy: Any, prompt: list[int], cfg: Exp3Config, layer: int) -> dict[str, Any]:
    """Plain vs hooked generation at ``layer``, alternating, median of ``generation_repeats``."""
    plain_ms, hooked_ms = [], []
    for i in range(cfg.timing.warmup + cfg.timing.generation_repeats):
        _, p_ms = _timed_generation(model, anatomy, prompt, cfg.max_new_tokens, None)
        _, h_ms = _timed_generation(model, anatomy, prompt, cfg.max_new_tokens, anatomy.blocks[layer])
        if i >= cfg.timing.warmup:
            plain_ms.append(p_ms)
            hooked_ms.append(h_ms)
    p, h = stats(plain_ms), stats(hooked_ms)
    r = ratio(h.median_ms, p.median_ms)
    return {
        "layer": layer,
        "generation_plain_ms": p.as_dict(),
        "generation_hooked_ms": h.as_dict(),
        "hooked_over_plain": r,
        "hook_overhead_pct": None if r is None else (r - 1.0) * 100.0,
    }


def run_eager_baseline(
    model: Any, anatomy: Any, prompt: list[int], cfg: Exp3Config, layers: list[int], steering_layer: int
) -> dict[str, Any]:
    """Token accuracy (layers x trials), hook overhead and remaining-layers time per layer, and
    steering, in plain PyTorch. The hook overhead is timed at the steering layer."""
    n, timing = cfg.max_new_tokens, cfg.timing
    plain = eager.greedy(model, anatomy, prompt, n, keep_logits=True)
    per_layer = []
    for layer in layers:
        accs = [
            token_accuracy(_timed_generation(model, anatomy, prompt, n, anatomy.blocks[layer])[0], plain.token_ids)
            for _ in range(cfg.num_trials)
        ]
        cap = eager.capture(model, anatomy, prompt, layer)
        setup, run = eager.tail_runner(anatomy, cap)
        tail, _ = measure(run, timing.warmup, timing.repeats, setup=setup)
        per_layer.append({"layer": layer, "token_accuracy_per_trial": accs, "remaining_layers_alone_ms": tail.as_dict()})
    overhead = _hook_overhead(model, anatomy, prompt, cfg, steering_layer)
    steering = None
    if cfg.steering.enabled:
        with eager.steered(model, steering_layer, cfg.steering.modification_type, cfg.steering.modification_factor):
            steered = eager.greedy(model, anatomy, prompt, n, keep_logits=True)
        steering = {
            "layer": steering_layer,
            "modification_type": cfg.steering.modification_type,
            "modification_factor": cfg.steering.modification_factor,
            **steering_effect(plain.token_ids, steered.token_ids, plain.logits[0], steered.logits[0]),
            "steered_token_ids": steered.token_ids,
        }
    return {
        "run": True,
        "method": "plain eager PyTorch in one process: model forward with a KV cache, forward hooks",
        "token_ids": plain.token_ids,
        "tokens_per_s": len(plain.token_ids) / (overhead["generation_plain_ms"]["median_ms"] / 1e3),
        "layers": per_layer,
        "hook_overhead": overhead,
        "steering": steering,
    }


def not_run(reason: str) -> dict[str, Any]:
    return {"run": False, "reason": reason}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--device", default=None)
    p.add_argument("--model", default=None, help="model source override (hub id, directory, embedded, random:<shape>)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, device=args.device, model_source=args.model)
    from djinn_nb.core.architecture import find_anatomy

    from ..exp3lib.session import load, prompt_ids, vocab_size

    model, tokenizer, name = load(cfg)
    anatomy = find_anatomy(model)
    prompt = prompt_ids(cfg, tokenizer, vocab_size(model))
    layers = cfg.resolve_layers(anatomy.num_layers)
    result = run_eager_baseline(model, anatomy, prompt, cfg, layers, cfg.resolve_steering_layer(layers, anatomy.num_layers))
    result.update(model=name, config=cfg.as_dict(), environment=environment(cfg.device, model_dtype(cfg.dtype, cfg.device, cfg.model_source)))
    path = write_json(Path(args.output_dir) / RESULT_FILE, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
