"""SAE features at a pause against the logit lens there, and a never-firing feature condition (issue 24).

    python -m experiments.bench.features --model random:llama-7b --dtype bfloat16 --d-sae 32768 --out DIR

A random SAE in SAELens's format (``cfg.json`` + ``sae_weights.safetensors``, ``d_in`` the model's
width, ``--d-sae`` features, standard ReLU) written to a temporary directory, loaded by a
``djinn-server`` child process reached on loopback. Through the client:
1. at a pause in the prompt pass (``--positions`` positions) at the SAE's site, interleaved,
   ``run.features(sae, k)`` and ``run.lens(k)``; medians (goal: features ≤ 1.2× lens);
2. ``generate(prompt, --tokens)`` unarmed, and armed with ``feature(sae, 0) > 1e30`` at every
   step (never true), interleaved; medians (goal: armed ≤ 1.02× unarmed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

import djinn_nb

from ..exp3_whitebox.exp3lib.cli import add_model_args
from ..exp3_whitebox.exp3lib.env import environment, write_json
from ..harness.server_process import djinn_server


def write_sae(path: Path, d_in: int, d_sae: int, hook: str) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"W_enc": torch.randn(d_in, d_sae, generator=g) * d_in ** -0.5,
               "W_dec": torch.randn(d_sae, d_in, generator=g) * d_sae ** -0.5,
               "b_enc": torch.randn(d_sae, generator=g) * 0.1, "b_dec": torch.randn(d_in, generator=g) * 0.1}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "sae_weights.safetensors"))
    cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": "standard",
           "metadata": {"sae_lens_version": "6.0.0", "hook_name": hook}}
    (path / "cfg.json").write_bytes(json.dumps(cfg).encode())  # the SAE's own file, not a result (write_json)


def medians(cases: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--d-sae", type=int, default=32768)
    p.add_argument("--positions", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--out", default="experiments/out/features")
    a = p.parse_args(argv)
    hook = f"blocks.{a.layer}.hook_resid_post"
    with tempfile.TemporaryDirectory(prefix="djinn-sae-") as tmp, djinn_server(a.model, a.device, a.dtype) as address:
        client = djinn_nb.connect(address)
        info = client.info
        write_sae(Path(tmp) / "sae", int(info["hidden_size"]), a.d_sae, hook)
        t0 = time.perf_counter()
        sae = client.load_sae(str(Path(tmp) / "sae"), site=hook, id="bench")
        load_ms = (time.perf_counter() - t0) * 1e3
        vocab = int(info.get("vocab_size") or 1000)
        prompt = [(31 * i + 7) % (min(vocab, 50000) - 10) + 10 for i in range(a.positions)]
        run = client.generate(prompt, max_new_tokens=4, breakpoints=[(a.layer, 0)])
        read = medians({"features": lambda: run.features(sae, k=a.k), "lens": lambda: run.lens(k=a.k)}, a.rounds)
        run.close()
        armed = [{"layer": a.layer, "step": "all", "when": f"feature({sae.id}, 0) > 1e30"}]

        def generate(bps: list[Any]) -> None:
            r = client.generate(prompt[:32], max_new_tokens=a.tokens, breakpoints=bps)
            assert r.done, "the condition fired"
            r.close()

        gen = medians({"unarmed": lambda: generate([]), "armed": lambda: generate(armed)}, max(5, a.rounds // 2))
        dtype = info.get("dtype")
        client.close()
    out = {"environment": environment(a.device, dtype), "model": a.model, "layer": a.layer, "d_sae": a.d_sae,
           "positions": a.positions, "k": a.k, "rounds": a.rounds, "load_sae_ms": load_ms,
           "read_median_ms": read, "features_over_lens": read["features"] / read["lens"],
           "generate_median_ms": gen, "new_tokens": a.tokens, "armed_over_unarmed": gen["armed"] / gen["unarmed"],
           "goals": "features <= 1.2 x lens; armed <= 1.02 x unarmed"}
    print(out)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(a.out) / f"features_{a.model.replace(':', '_').replace('/', '_')}_{out['environment']['dtype']}.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
