"""Host cost per step of armed / conditional breakpoints, two versions of djinn_nb in one process.

    git archive <base-commit> djinn_nb | tar -x -C /tmp/base && mv /tmp/base/djinn_nb /tmp/base/djinn_nb_base
    PYTHONPATH=/tmp/base python -m experiments.probes.cpu_armed_ab --out DIR

Small CPU model (host overhead dominates), one torch thread. Each round runs, in
a shuffled order and for both versions: a plain generation, one paused and
resumed at (middle layer, every step), one with a conditional breakpoint at
every step that never fires, and one with a no-op hook on that block (the noise
calibrator). Time is the thread's CPU time (``time.thread_time``), which other
processes on a shared machine disturb less than wall time; reported: the median
over rounds of (variant - plain of the same version and round) per step. And the
adjacent-steps method: one run armed (or conditional) on even steps only, its
median even step minus its median odd step (wall time), median over rounds.
"""
from __future__ import annotations

import argparse
import importlib
import random
import statistics
import time
from pathlib import Path

import torch

from ..exp3_whitebox.exp3lib.env import environment, write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-tiny")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--out", default="experiments/out/cpu_armed_ab")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    versions = {}
    for tag, pkg in (("before", "djinn_nb_base"), ("after", "djinn_nb")):
        Engine = importlib.import_module(f"{pkg}.core.engine").Engine
        build_random = importlib.import_module(f"{pkg}.core.models").build_random
        versions[tag] = Engine(build_random(args.model, seed=0), None, args.model)  # one model each: no shared hooks
    n = args.new_tokens
    prompt = list(range(1, args.prompt + 1))

    def variants(e):
        layer = e.num_layers // 2

        def plain():
            return e.generate(prompt, n)

        def armed():
            r = e.generate(prompt, n, breakpoints=[(layer, "all")])
            while r.paused:
                e.resume(r.id)
            return r

        def cond():
            return e.generate(prompt, n, breakpoints=[{"layer": layer, "step": "all", "when": "top1_prob > 2"}])

        def hook():
            h = e.anatomy.blocks[layer].register_forward_hook(lambda *_: None)
            try:
                return e.generate(prompt, n)
            finally:
                h.remove()

        def alt_armed():
            r = e.generate(prompt, n, breakpoints=[(layer, s) for s in range(0, n, 2)])
            while r.paused:
                e.resume(r.id)
            return r

        def alt_cond():
            return e.generate(prompt, n, breakpoints=[{"layer": layer, "step": s, "when": "top1_prob > 2"}
                                                      for s in range(0, n, 2)])

        return {"plain": plain, "armed": armed, "conditional": cond, "noop_hook": hook,
                "alt_armed": alt_armed, "alt_conditional": alt_cond}

    jobs = [(tag, name, f, e) for tag, e in versions.items() for name, f in variants(e).items()]
    cpu = {(tag, name): [] for tag, name, _, _ in jobs}
    adjacent = {(tag, name): [] for tag, name, _, _ in jobs if name.startswith("alt_")}
    adjacent_base = {k: [] for k in adjacent}
    tokens = {}
    rng = random.Random(0)
    for i in range(args.rounds + 2):
        rng.shuffle(jobs)
        for tag, name, f, e in jobs:
            c0 = time.thread_time()
            run = f()
            dt = time.thread_time() - c0
            tokens[(tag, name)] = tuple(run.token_ids)
            e.close(run.id)
            if i < 2:
                continue
            if name.startswith("alt_"):  # wall time of adjacent steps of one run: even (armed) minus odd
                d = [b - a for a, b in zip(run.token_times, run.token_times[1:])]  # d[k-1]: step k
                even = statistics.median(d[k - 1] for k in range(2, len(run.token_times), 2))
                odd = statistics.median(d[k - 1] for k in range(1, len(run.token_times), 2))
                adjacent[(tag, name)].append((even - odd) * 1e6)
                adjacent_base[(tag, name)].append(odd * 1e6)
            else:
                cpu[(tag, name)].append(dt / n * 1e6)
    out = {"model": args.model, "prompt_tokens": args.prompt, "new_tokens": n, "rounds": args.rounds,
           "clock": "thread CPU time, us per generated token", "environment": environment("cpu", "float32"),
           "same_tokens_all": len(set(tokens.values())) == 1, "versions": {}}
    for tag in versions:
        plain = cpu[(tag, "plain")]
        v = {"plain_us_per_step": statistics.median(plain)}
        for name in ("armed", "conditional", "noop_hook"):
            d = sorted(a - b for a, b in zip(cpu[(tag, name)], plain))
            q = statistics.quantiles(d, n=4)
            v[name] = {"extra_us_per_step": statistics.median(d), "p25": q[0], "p75": q[2],
                       "overhead_pct": statistics.median(d) / statistics.median(plain) * 100}
        for name in ("alt_armed", "alt_conditional"):
            d = sorted(adjacent[(tag, name)])
            q = statistics.quantiles(d, n=4)
            v[name] = {"extra_us_per_step": statistics.median(d), "p25": q[0], "p75": q[2],
                       "overhead_pct": statistics.median(d) / statistics.median(adjacent_base[(tag, name)]) * 100,
                       "what": "wall time, one run armed on even steps: median even step minus median odd step"}
        out["versions"][tag] = v
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / f"cpu_armed_ab_{args.model}.json", out)
    print(f"{args.model}, {n} tokens, {args.rounds} rounds, CPU us/step; same tokens everywhere: {out['same_tokens_all']}")
    for tag, v in out["versions"].items():
        print(f"  {tag:6s} plain {v['plain_us_per_step']:7.1f}" + "".join(
            f"  {k} {v[k]['extra_us_per_step']:+6.1f} ({v[k]['overhead_pct']:+.2f}%, IQR {v[k]['p25']:+.0f}..{v[k]['p75']:+.0f})"
            for k in ("armed", "conditional", "noop_hook", "alt_armed", "alt_conditional")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
