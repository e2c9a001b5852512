"""Armed-breakpoint overhead (issue 5's goal: <= 1 %), measured in paired rounds.

    python -m experiments.bench.armed --model random:gpt2 --device cuda:0 --out DIR

Whole greedy generations in one process on the engine, variants per round in a
shuffled order: plain; a breakpoint at (middle layer, every step) paused and
resumed in-process; a watch at the same place (records, no pause); a no-op torch
forward hook on that block, the noise calibrator (its true cost is ~0); and a
conditional breakpoint there at every step that never fires (``top1_prob > 2``:
each step runs unpaused and is tested on the server). Reported: the median over
rounds of each variant's time / plain's time in the same round, with the
25th-75th percentile of those ratios. And, least exposed to drift: one run armed
on even steps only, its even steps' median time over its odd steps' (adjacent
steps of one generation) — for the pausing breakpoint and for the conditional one — and
the same even/odd ratio of the plain runs (a parity calibrator: an unarmed run's even steps
need not take exactly what its odd ones do), with each armed ratio also given over the
plain runs' ratio of the same round.
Rounds stop early after ``--max-seconds`` (at least ``--min-rounds``).

Before/after on one machine: ``--package djinn_nb_base`` measures another commit's
package (``git archive <commit> djinn_nb | tar -x -C /tmp/base`` renamed to
``djinn_nb_base``, with ``PYTHONPATH=.:/tmp/base``), so both can run in one session.
"""
from __future__ import annotations

import argparse
import importlib
import random
import statistics
import time
from pathlib import Path

import torch

from ..exp3_whitebox.exp3lib.cli import add_generation_args
from ..exp3_whitebox.exp3lib.env import environment, model_dtype, write_json
from ..exp3_whitebox.exp3lib.timing import sync


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_args(p)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--min-rounds", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=130.0, help="stop adding rounds after this long")
    p.add_argument("--package", default="djinn_nb",
                   help="the package to measure, e.g. djinn_nb_base: another commit's djinn_nb, renamed")
    p.add_argument("--out", default="experiments/out/armed")
    args = p.parse_args(argv)
    Engine = importlib.import_module(f"{args.package}.core.engine").Engine
    load_model = importlib.import_module(f"{args.package}.core.models").load_model
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

    never = "top1_prob > 2"  # a probability never exceeds 2: every step is tested, none pauses

    def conditional():
        return engine.generate(prompt, args.new_tokens, breakpoints=[{"layer": layer, "step": "all", "when": never}])

    def cond_alternate():
        """Conditional breakpoints on even steps only (never firing): adjacent tested and untested steps."""
        bps = [{"layer": layer, "step": s, "when": never} for s in range(0, args.new_tokens, 2)]
        return engine.generate(prompt, args.new_tokens, breakpoints=bps)

    variants = {"plain": plain, "armed": armed, "watch": watch, "noop_hook": hook, "alternate": alternate,
                "conditional": conditional, "cond_alternate": cond_alternate}
    # "plain": the same even/odd split of an unarmed run, the parity calibrator (an even step
    # need not cost what an odd one does even unarmed; the armed figures are also given over it)
    step_pairs: dict[str, list[float]] = {"alternate": [], "cond_alternate": [], "plain": []}
    times: dict[str, list[float]] = {k: [] for k in variants}
    tokens: dict[str, list[int]] = {}
    rng = random.Random(0)
    started = time.perf_counter()
    for i in range(args.rounds + 3):
        if i >= args.min_rounds + 3 and time.perf_counter() - started > args.max_seconds:
            break
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            sync()
            t0 = time.perf_counter()
            run = variants[name]()
            sync()
            dt = time.perf_counter() - t0
            tokens[name] = run.token_ids
            if name in step_pairs and i >= 3:
                d = [b - a for a, b in zip(run.token_times, run.token_times[1:])]  # d[k-1]: step k
                armed_steps = [d[k - 1] for k in range(2, len(run.token_times), 2)]
                plain_steps = [d[k - 1] for k in range(1, len(run.token_times), 2)]
                step_pairs[name].append(statistics.median(armed_steps) / statistics.median(plain_steps))
            engine.close(run.id)
            if i >= 3:
                times[name].append(dt * 1e3)
    rounds = len(times["plain"])
    out = {"model": args.model, "dtype": args.dtype, "package": args.package, "layer": layer, "seq_len": args.seq,
           "new_tokens": args.new_tokens, "rounds": rounds, "environment": environment(args.device, model_dtype(args.dtype, args.device, args.model)),
           "same_tokens_all_variants": len({tuple(t) for t in tokens.values()}) == 1,
           "plain_ms_median": statistics.median(times["plain"]), "variants": {}}
    whats = {"alternate": "within one run, breakpoint paused+resumed on even steps; median even-step time over median odd-step time",
             "cond_alternate": "within one run, a never-firing conditional breakpoint on even steps; median even-step time over median odd-step time",
             "plain": "an unarmed run's median even-step time over its median odd-step time (parity calibrator: ideally 1)"}
    for name, pairs in step_pairs.items():
        q = statistics.quantiles(pairs, n=4)
        out[f"{name}_steps"] = {
            "armed_over_plain_step_median": statistics.median(pairs),
            "overhead_pct": (statistics.median(pairs) - 1) * 100,
            "per_round_p25": q[0], "per_round_p75": q[2],
            "per_round": pairs,
            "what": whats[name],
        }
        if name != "plain":  # over the same round's unarmed parity: drift and any even/odd bias cancel
            over = [a / b for a, b in zip(pairs, step_pairs["plain"])]
            qo = statistics.quantiles(over, n=4)
            out[f"{name}_steps"].update(over_plain_parity_median=statistics.median(over),
                                        over_plain_parity_pct=(statistics.median(over) - 1) * 100,
                                        over_plain_parity_p25=qo[0], over_plain_parity_p75=qo[2])
    for name in ("armed", "watch", "noop_hook", "conditional"):
        ratios = sorted(a / b for a, b in zip(times[name], times["plain"]))
        q = statistics.quantiles(ratios, n=4)
        out["variants"][name] = {"ms_median": statistics.median(times[name]), "ratio_median": statistics.median(ratios),
                                 "ratio_p25": q[0], "ratio_p75": q[2],
                                 "overhead_pct": (statistics.median(ratios) - 1) * 100}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tag = args.model.replace(':', '_') + (f"_{args.dtype}" if args.dtype else "") + \
        (f"_{args.package}" if args.package != "djinn_nb" else "")
    write_json(Path(args.out) / f"bench_armed_{tag}.json", out)
    print(f"{args.model}: plain {out['plain_ms_median']:.1f} ms for {args.new_tokens} tokens, {rounds} rounds; "
          f"same tokens: {out['same_tokens_all_variants']}")
    for name, v in out["variants"].items():
        print(f"  {name:11s} {v['overhead_pct']:+.2f}%  (paired ratio p25..p75 {v['ratio_p25']:.3f}..{v['ratio_p75']:.3f})")
    for name in step_pairs:
        a = out[f"{name}_steps"]
        over = (f"; over the unarmed run's parity {a['over_plain_parity_pct']:+.2f}% "
                f"(p25..p75 {a['over_plain_parity_p25']:.3f}..{a['over_plain_parity_p75']:.3f})") if name != "plain" else ""
        print(f"  {name} steps (even vs odd steps of one run): {a['overhead_pct']:+.2f}%"
              f"  (per-round p25..p75 {a['per_round_p25']:.3f}..{a['per_round_p75']:.3f}){over}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
