"""Sites inside a block on a GPU: exactness, fork latency from mlp_out vs the block output, lens grid cost.

    python -m experiments.bench.sites --model random:gpt2 --dtype float32 --layer 6 --out DIR
    python -m experiments.bench.sites --model random:llama-7b --dtype bfloat16 --layer 16 --out DIR

1. Exactness: one run pausing at every site of ``layer`` at the prompt pass and at a
   decoding step resumes to the tokens of the unpaused run; a fork with ``scale`` at each
   site gives the tokens of plain HF ``generate`` with the same edit by a hook on that
   site's module (``djinn_nb.core.reference``).
2. Fork latency (engine, in-process, seq ``--seq``): to the next token from ``mlp_out``
   and from ``resid_post`` of ``layer``, interleaved, median of ``--rounds``.
3. Lens grid: ``engine.lens_grid`` (every layer × every position, top-1) vs a plain
   forward of the same prompt, interleaved, medians.
Writes ``bench_sites_<model>.json`` with the card and versions.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from djinn_nb.core import reference
from djinn_nb.core.engine import Engine
from djinn_nb.core.models import load_model
from djinn_nb.core.sites import SITES
from djinn_nb.core.specs import Edit

from ..exp3_whitebox.exp3lib.cli import add_generation_args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def exactness(engine: Engine, layer: int, prompt: list[int], new: int) -> dict:
    plain = engine.generate(prompt, new).token_ids
    sites = engine.info()["sites"]
    out: dict = {"sites": sites}
    for step in (0, 2):
        run = engine.generate(prompt, new, [(layer, step, s) for s in sites])
        order = []
        while run.paused:
            order.append(run.site)
            engine.resume(run.id)
        out[f"pause_every_site_step{step}"] = {"order_ok": order == sites, "tokens_equal": run.token_ids == plain}
    model = engine.model
    forks = {}
    # resid_mid has no module of its own: a hook on the MLP's norm would change the MLP's input only,
    # not the residual the edit also carries, so it is no reference for a resid_mid edit.
    for site in [s for s in sites if s != "resid_mid"]:
        module, pre = engine.parts[layer].point(site)
        ref = reference.generate(model, prompt, new, edit_layer=layer, edit_call=0, edit=lambda h: h * 0.9,
                                 module_of=lambda _m, _i, module=module, pre=pre: (module, pre))
        run = engine.generate(prompt, new, [(layer, 0, site)])
        fork = engine.fork(run.id, Edit(scale=0.9), breakpoints=[])
        forks[site] = {"tokens_equal": fork.token_ids == ref, "changed_vs_plain": ref != plain}
        engine.close(run.id)
        engine.close(fork.id)
    out["fork_scale_0.9_vs_hook"] = forks
    out["all_exact"] = all(v["order_ok"] and v["tokens_equal"] for k, v in out.items() if k.startswith("pause_")) and all(
        v["tokens_equal"] for v in forks.values())
    return out


def fork_latency(engine: Engine, layer: int, prompt: list[int], rounds: int) -> dict:
    times: dict[str, list[float]] = {"mlp_out": [], "resid_post": []}
    runs = {s: engine.generate(prompt, 4, [(layer, 0, s)]) for s in times}
    for i in range(rounds + 3):
        for site, run in runs.items():
            _sync(engine.device)
            t0 = time.perf_counter()
            f = engine.fork(run.id, Edit(scale=0.9), breakpoints=[], max_new_tokens=1)
            _sync(engine.device)
            if i >= 3:
                times[site].append(time.perf_counter() - t0)
            engine.close(f.id)
    med = {s: statistics.median(v) * 1e3 for s, v in times.items()}
    return {"median_ms": med, "ratio_mlp_out_vs_resid_post": med["mlp_out"] / med["resid_post"], "rounds": rounds,
            "continued_by": "cuda graphs" if engine.cuda_graphs else "eager"}


def lens_grid_cost(engine: Engine, prompt: list[int], rounds: int) -> dict:
    from transformers import DynamicCache

    grid, plain = [], []
    ids = torch.tensor([prompt], device=engine.device)
    for i in range(rounds + 2):
        _sync(engine.device)
        t0 = time.perf_counter()
        engine.lens_grid(prompt, 1)
        _sync(engine.device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            engine.model(input_ids=ids, past_key_values=DynamicCache(config=engine.model.config), use_cache=True)
        _sync(engine.device)
        t2 = time.perf_counter()
        if i >= 2:
            grid.append(t1 - t0)
            plain.append(t2 - t1)
    g, p = statistics.median(grid) * 1e3, statistics.median(plain) * 1e3
    return {"lens_grid_ms": g, "plain_forward_ms": p, "ratio": g / p, "layers": engine.num_layers,
            "positions": len(prompt), "rounds": rounds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_args(p, dtype="float32", new_tokens=None)  # forks run to one token
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default="experiments/out/sites")
    a = p.parse_args(argv)
    loaded = load_model(a.model, device=a.device, dtype=a.dtype)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.name)
    vocab = int(loaded.model.config.vocab_size)
    prompt = torch.randint(0, vocab, (a.seq,), generator=torch.Generator().manual_seed(0)).tolist()
    result = {
        "model": a.model, "dtype": a.dtype, "layer": a.layer, "seq": a.seq, "sites": SITES,
        "inexact_sites": engine.inexact_sites,
        "exactness": exactness(engine, a.layer, prompt[:32], 8),
        "fork_latency": fork_latency(engine, a.layer, prompt, a.rounds),
        "lens_grid": lens_grid_cost(engine, prompt, max(5, a.rounds // 3)),
        "env": {"torch": torch.__version__, "python": platform.python_version(),
                "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
                "transformers": __import__("transformers").__version__},
    }
    from ..exp3_whitebox.exp3lib.env import environment, write_json

    result["environment"] = environment(a.device, str(engine.dtype))
    write_json(Path(a.out) / f"bench_sites_{a.model.replace(':', '_').replace('/', '_')}.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
