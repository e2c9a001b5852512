"""What the attribution-patching estimate costs against one forward of the prompt, and the exact grid (issue 23).

    python -m experiments.bench.attribution_cost --model random:llama-7b --dtype bfloat16 --out DIR

Through the client to a ``djinn-server`` child process on loopback: ``attribution_patching`` of
a clean/corrupted pair of ``--positions`` token ids (resid_post, all layers × positions, metric
``prob``), and the exact ``causal_trace`` grid of the same pair; beside them, in this process, one
plain forward of the prompt with a cache (the same random weights). Medians of ``--rounds``.
Goal: the estimate ≤ 3× one forward. The floor: a forward and a backward are ~3 forwards of FLOPs
(two forwards and a backward here: ~4×, less where the backward stops at the embedding).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import djinn_nb
from djinn_nb.core.models import load_model
from djinn_nb.core.threads import apply_thread_setting

from ..exp3_whitebox.exp3lib.cli import add_model_args
from ..exp3_whitebox.exp3lib.env import environment, write_json
from ..harness.server_process import djinn_server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--positions", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default="experiments/out/attribution_cost")
    a = p.parse_args(argv)
    apply_thread_setting()
    model = load_model(a.model, device=a.device, dtype=a.dtype).model
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    clean = [(31 * i + 7) % (min(vocab, 50000) - 10) + 10 for i in range(a.positions)]
    corrupted = list(clean)
    corrupted[2] = (corrupted[2] + 1) % vocab
    answer = 11
    ids = torch.tensor([clean], device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def forward() -> None:
        from transformers import DynamicCache

        with torch.inference_mode():
            model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True)

    times: dict[str, list[float]] = {"forward": [], "attribution": [], "exact_grid": []}
    with djinn_server(a.model, a.device, a.dtype) as address:
        client = djinn_nb.connect(address)
        cases = {"forward": forward,
                 "attribution": lambda: djinn_nb.attribution_patching(client, clean, corrupted, answer=answer, metric="prob"),
                 "exact_grid": lambda: djinn_nb.causal_trace(client, clean, corrupted, answer=answer, progress=False)}
        for fn in cases.values():  # warm-up
            fn()
        for _ in range(a.rounds):
            for name, fn in cases.items():
                for _ in range(3):  # in blocks: two processes' CUDA contexts alternate once per block
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    times[name].append((time.perf_counter() - t0) * 1e3)
        client.close()
    med = {name: statistics.median(v) for name, v in times.items()}
    out = {"environment": environment(device, next(model.parameters()).dtype), "model": a.model,
           "positions": a.positions, "layers": int(model.config.num_hidden_layers), "rounds": a.rounds,
           "median_ms": med, "attribution_over_forward": med["attribution"] / med["forward"],
           "exact_grid_over_attribution": med["exact_grid"] / med["attribution"],
           "goal": "attribution <= 3 x one forward"}
    print(out)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(a.out) / f"attribution_cost_{a.model.replace(':', '_').replace('/', '_')}_{out['environment']['dtype']}.json",
               out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
