"""The checkpoint's interference with generation, and each part of a pause/resume timed separately.

For each prompt length and breakpoint layer: checkpoint (capture at the pause),
remaining layers alone (plain PyTorch), fork in-process and through the client
(with transport = round trip - server time), resume through the client; then
tokens/s with a breakpoint armed at every step and auto-resumed vs none. On CUDA
it also probes the remaining layers replayed as one captured CUDA graph.

    python -m experiments.exp3_whitebox.measure_checkpoint_cost \\
        --config experiments/exp3_whitebox/configs/gpt2_h100.yaml --output-dir /tmp/cost --seq-lens 128 512
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import traceback
from pathlib import Path
from typing import Any


import torch

from .exp3lib import costs
from .exp3lib.config import load_config
from .exp3lib.env import environment, model_dtype, setup_logging, write_json
from .exp3lib.session import open_session, prompt_ids, vocab_size

RESULT_FILE = "checkpoint_cost_results.json"
log = logging.getLogger("exp3")


def _try(name: str, errors: dict[str, str], fn: Any) -> Any:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - keep the other measurements
        errors[name] = f"{type(e).__name__}: {e}"
        log.error("%s failed: %s\n%s", name, errors[name], traceback.format_exc())
        return None


def _line(seq: int, b: dict[str, Any]) -> str:
    return (f"seq {seq:5d} layer {b['layer']:3d} [{b['block_device']}]: checkpoint {b['checkpoint_ms']['median_ms']:.3f} | "
            f"remaining {b['remaining_layers_alone_ms']['median_ms']:.3f} | fork engine {b['fork_engine_ms']['median_ms']:.3f} "
            f"({b['ratios']['fork_engine_over_remaining_layers']:.2f}x) | fork client {b['fork_client_ms']['median_ms']:.3f} "
            f"({b['ratios']['fork_client_over_remaining_layers']:.2f}x) | transport {b['transport_ms']:.3f} | "
            f"resume client {b['resume_client_ms']['median_ms']:.3f}  (ms, medians)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--device", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device-map", default=None)
    p.add_argument("--seq-lens", type=int, nargs="*", default=None, help="prompt lengths (random ids); default: the config's prompt")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="breakpoint layers; default: the config's")
    p.add_argument("--no-cuda-graph", action="store_true", help="skip the CUDA-graph probe")
    args = p.parse_args(argv)
    cfg = load_config(args.config, device=args.device, model_source=args.model, dtype=args.dtype, device_map=args.device_map)
    out = Path(args.output_dir)
    setup_logging(out / "checkpoint_cost.log")
    env = environment(cfg.device, model_dtype(cfg.dtype, cfg.device, cfg.model_source))
    errors: dict[str, str] = {}
    session = open_session(cfg)
    result: dict[str, Any] = {"config": cfg.as_dict(), "environment": env, "errors": errors}
    try:
        n_layers = session.engine.num_layers
        layers = args.layers or cfg.resolve_layers(n_layers)
        layers = [l for l in layers if l < n_layers - 1]  # the last block leaves no remaining layers
        steer = cfg.resolve_steering_layer(cfg.resolve_layers(n_layers), n_layers)
        seqs = args.seq_lens or [None]
        result.update(model=session.engine.name, num_layers=n_layers, layers=layers,
                      block_devices={str(l): session.block_devices()[l] for l in layers}, by_seq=[])
        for seq in seqs:
            c = dataclasses.replace(cfg, prompt_tokens=seq) if seq else cfg
            prompt = prompt_ids(c, session.engine.tokenizer, vocab_size(session.model))
            entry: dict[str, Any] = {"seq_len": len(prompt), "breakdown": [], "cuda_graph_probe": []}
            for layer in layers:
                b = _try(f"breakdown seq {len(prompt)} layer {layer}", errors,
                         lambda prompt=prompt, layer=layer: costs.latency_breakdown(session, prompt, layer, cfg.timing))
                if b:
                    entry["breakdown"].append(b)
                    log.info(_line(len(prompt), b))
            entry["armed_overhead"] = _try(f"armed overhead seq {len(prompt)}", errors,
                                           lambda prompt=prompt: costs.armed_overhead(session, prompt, steer, cfg.max_new_tokens, cfg.timing))
            a = entry["armed_overhead"]
            if a:
                log.info("seq %d: armed at layer %d every step, auto-resumed: engine %+.2f%%, client %+.2f%%; tokens/s plain "
                         "engine %.1f client %.1f", len(prompt), steer, a["engine_overhead_pct"], a["client_overhead_pct"],
                         a["tokens_per_s"]["engine_plain"], a["tokens_per_s"]["client_plain"])
            # Last: a failed graph capture must not disturb the measurements above.
            if torch.cuda.is_available() and not args.no_cuda_graph and not cfg.device_map:
                for layer in layers:
                    g = _try(f"cuda graph seq {len(prompt)} layer {layer}", errors,
                             lambda prompt=prompt, layer=layer: costs.tail_cuda_graph(session, prompt, layer, cfg.timing))
                    if g:
                        entry["cuda_graph_probe"].append(g)
                        log.info("   layer %d: remaining layers as a CUDA graph %.3f ms vs eager %.3f ms (no cache write; "
                                 "logits equal: %s)", layer, g["graph_replay_ms"]["median_ms"],
                                 g["eager_without_cache_write_ms"]["median_ms"], g["graph_logits_equal_eager_with_cache"])
            result["by_seq"].append(entry)
    finally:
        session.close()
    print(f"wrote {write_json(out / RESULT_FILE, result)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
