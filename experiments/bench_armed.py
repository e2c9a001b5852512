"""Armed-breakpoint overhead (issue 5's goal: <= 1 %), measured in paired rounds.

    python -m experiments.bench_armed --model random:gpt2 --device cuda:0 --out DIR

Whole greedy generations in one process on the engine, four variants per round
in a shuffled order: plain; a breakpoint at (middle layer, every step) paused and
resumed in-process; a watch at the same place (records, no pause); and a no-op
torch forward hook on that block, the noise calibrator (its true cost is ~0).
Reported: the median over rounds of each variant's time / plain's time in the
same round, with the 25th-75th percentile of those ratios. And, least exposed to
drift: one run armed on even steps only, its even steps' median time over its
odd steps' (adjacent steps of one generation).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from djinn_nb.core.engine import Engine
from djinn_nb.core.models import load_model

from .exp3_whitebox.exp3lib.env import environment, write_json
from .exp3_whitebox.exp3lib.timing import sync


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--out", default="experiments/out/bench_armed")
    args = p.parse_args(argv)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    engine = Engine(loaded.model, loaded.tokenizer, args.model)
    layer = engine.num_layers // 2
    prompt = torch.randint(0, engine.info()["vocab_size"], (args.seq,), generator=torch.Generator().manual_seed(0)).tolist()
    every = [(layer, "all")]
    block = engine.anatomy.blocks[layer]

    def plain():
        return engine.generate(prompt, args.new_tokens)

    def armed():
        run = engine.generate(prompt, args.new_tokens, breakpoints=every)
        while run.paused:
            engine.resume(run.id)
        return run

    def watch():
        return engine.generate(prompt, args.new_tokens, watches=every)

    def hook():
        h = block.register_forward_hook(lambda *_: None)
        try:
            return engine.generate(prompt, args.new_tokens)
        finally:
            h.remove()

    def alternate():
        """Armed on even steps only: adjacent armed and plain steps of one run, so drift cancels."""
        run = engine.generate(prompt, args.new_tokens, breakpoints=[(layer, s) for s in range(0, args.new_tokens, 2)])
        while run.paused:
            engine.resume(run.id)
        return run

    variants = {"plain": plain, "armed": armed, "watch": watch, "noop_hook": hook, "alternate": alternate}
    step_pairs: list[float] = []
    times: dict[str, list[float]] = {k: [] for k in variants}
    tokens: dict[str, list[int]] = {}
    rng = random.Random(0)
    for i in range(args.rounds + 3):
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            sync()
            t0 = time.perf_counter()
            run = variants[name]()
            sync()
            dt = time.perf_counter() - t0
            tokens[name] = run.token_ids
            if name == "alternate" and i >= 3:
                d = [b - a for a, b in zip(run.token_times, run.token_times[1:])]  # d[k-1]: step k
                armed_steps = [d[k - 1] for k in range(2, len(run.token_times), 2)]
                plain_steps = [d[k - 1] for k in range(1, len(run.token_times), 2)]
                step_pairs.append(statistics.median(armed_steps) / statistics.median(plain_steps))
            engine.close(run.id)
            if i >= 3:
                times[name].append(dt * 1e3)
    out = {"model": args.model, "layer": layer, "seq_len": args.seq, "new_tokens": args.new_tokens,
           "rounds": args.rounds, "environment": environment(args.device),
           "same_tokens_all_variants": len({tuple(t) for t in tokens.values()}) == 1,
           "plain_ms_median": statistics.median(times["plain"]), "variants": {}}
    out["alternate_steps"] = {
        "armed_over_plain_step_median": statistics.median(step_pairs),
        "overhead_pct": (statistics.median(step_pairs) - 1) * 100,
        "per_round": step_pairs,
        "what": "within one run, breakpoint paused+resumed on even steps; median even-step time over median odd-step time",
    }
    for name in ("armed", "watch", "noop_hook"):
        ratios = sorted(a / b for a, b in zip(times[name], times["plain"]))
        q = statistics.quantiles(ratios, n=4)
        out["variants"][name] = {"ms_median": statistics.median(times[name]), "ratio_median": statistics.median(ratios),
                                 "ratio_p25": q[0], "ratio_p75": q[2],
                                 "overhead_pct": (statistics.median(ratios) - 1) * 100}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / f"bench_armed_{args.model.replace(':', '_')}.json", out)
    print(f"{args.model}: plain {out['plain_ms_median']:.1f} ms for {args.new_tokens} tokens; same tokens: {out['same_tokens_all_variants']}")
    for name, v in out["variants"].items():
        print(f"  {name:10s} {v['overhead_pct']:+.2f}%  (paired ratio p25..p75 {v['ratio_p25']:.3f}..{v['ratio_p75']:.3f})")
    q = statistics.quantiles(step_pairs, n=4)
    print(f"  alternate steps (armed even vs plain odd steps of one run): {out['alternate_steps']['overhead_pct']:+.2f}%"
          f"  (per-round p25..p75 {q[0]:.3f}..{q[2]:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
