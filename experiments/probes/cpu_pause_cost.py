"""The host cost of one armed pause+resume per step, by model depth, on the CPU (issue 14, item 1).

    PYTHONPATH=. python -m experiments.probes.cpu_pause_cost --out experiments/results/cpu-2core/armed
    # before/after in one process: a base commit's package, renamed
    git archive <base> djinn_nb | tar -x -C /tmp/base && mv /tmp/base/djinn_nb /tmp/base/djinn_nb_base
    PYTHONPATH=.:/tmp/base python -m experiments.probes.cpu_pause_cost --base djinn_nb_base --out DIR

Tiny random models (width 64, 4 heads) on one torch thread, so a step is almost
all host work and the model's arithmetic is negligible; the same shapes with 12
and 32 blocks, GPT-2 and Llama, to see whether a pause's cost grows with depth.
Per round, in a shuffled order: a plain generation, one paused at (middle layer,
every step) and resumed in-process at once (``while run.paused: resume``), and
one armed on even steps only. Each decoding step's wall time comes from the
run's token times (wall) and from the thread's CPU time read as each token is taken
(``cpu``: what other processes on a shared machine take is not counted). Reported per model: the median over rounds of (median armed
step - median plain step of the same round), with its IQR, and the adjacent-steps
figure (even steps minus odd steps of the one run). A per-step difference is the
host work one pause and resume add, net of what the hand-run tail saves over the
model's own output handling. With ``--base``, the same for another version of the
package, its generations interleaved with this one's in every round (each version on its
own copy of the model). The machine is shared: compare within one file.
"""
from __future__ import annotations

import argparse
import importlib
import os
import random
import statistics
import time
from pathlib import Path

import torch

from djinn_nb.core.models import random_config

from ..exp3_whitebox.exp3lib.env import environment, write_json


def build(shape: str, layers: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = random_config(shape)
    setattr(cfg, "n_layer" if cfg.model_type == "gpt2" else "num_hidden_layers", layers)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def steps(t: list[float]) -> list[float]:
    """Each decoding step's time, us, from the clock read at each token (d[k - 1]: step k)."""
    return [(b - a) * 1e6 for a, b in zip(t, t[1:])]


def thread_clock(engine) -> dict[str, list[float]]:
    """Record the thread's CPU time as each run takes a token (time another process takes the
    core for does not count): run id -> clock readings."""
    marks: dict[str, list[float]] = {}
    take = engine.stepper.take_tokens

    def take_tokens(runs, logits):
        now = time.thread_time()
        for run in runs:
            marks.setdefault(run.id, []).append(now)
        return take(runs, logits)

    engine.stepper.take_tokens = take_tokens
    return marks


def quartiles(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4)
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2]}


def variants(engine, n: int, prompt: list[int]) -> dict:
    layer = engine.num_layers // 2

    def plain():
        return engine.generate(prompt, n)

    def armed():
        run = engine.generate(prompt, n, breakpoints=[(layer, "all")])
        while run.paused:
            engine.resume(run.id)
        return run

    def alternate():
        run = engine.generate(prompt, n, breakpoints=[(layer, s) for s in range(0, n, 2)])
        while run.paused:
            engine.resume(run.id)
        return run

    return {"plain": plain, "armed": armed, "alternate": alternate}


def measure(engines: dict, rounds: int, n: int, prompt: list[int], rng: random.Random) -> dict:
    """Every engine's variants in one shuffled order per round; per engine, the per-round medians."""
    jobs = [(key, name, f) for key, e in engines.items() for name, f in variants(e, n, prompt).items()]
    clocks = {key: thread_clock(e) for key, e in engines.items()}
    kinds = ("wall", "cpu")
    per_round = {(key, kind): {"plain": [], "armed": [], "extra": [], "adjacent": []}
                 for key in engines for kind in kinds}
    tokens: dict = {key: set() for key in engines}
    for i in range(rounds + 2):
        got: dict = {(key, kind): {} for key in engines for kind in kinds}
        rng.shuffle(jobs)
        for key, name, f in jobs:
            run = f()
            tokens[key].add(tuple(run.token_ids))
            got[(key, "wall")][name] = steps(run.token_times)
            got[(key, "cpu")][name] = steps(clocks[key].pop(run.id))
            engines[key].close(run.id)
        if i < 2:
            continue
        for k, g in got.items():
            plain_step, armed_step = statistics.median(g["plain"]), statistics.median(g["armed"])
            d = g["alternate"]
            even = statistics.median(d[j - 1] for j in range(2, len(d) + 1, 2))
            odd = statistics.median(d[j - 1] for j in range(1, len(d) + 1, 2))
            r = per_round[k]
            r["plain"].append(plain_step)
            r["armed"].append(armed_step)
            r["extra"].append(armed_step - plain_step)
            r["adjacent"].append(even - odd)
    out: dict = {}
    for (key, kind), r in per_round.items():
        plain_med = statistics.median(r["plain"])
        o = out.setdefault(key, {"layers": engines[key].num_layers, "pause_layer": engines[key].num_layers // 2,
                                 "same_tokens": len(tokens[key]) == 1})
        o[kind] = {
            "plain_step_us": quartiles(r["plain"]),
            "armed_step_us": quartiles(r["armed"]),
            "extra_us_per_pause": quartiles(r["extra"]),
            "adjacent_extra_us_per_pause": quartiles(r["adjacent"]),
            "extra_pct": statistics.median(r["extra"]) / plain_med * 100,
            "adjacent_pct": statistics.median(r["adjacent"]) / plain_med * 100,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2-tiny:12,gpt2-tiny:32,llama-tiny:12,llama-tiny:32",
                   help="shape:layers, comma-separated")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--base", default=None, help="also measure this package (e.g. djinn_nb_base), interleaved")
    p.add_argument("--tag", default="", help="appended to the output file's name")
    p.add_argument("--out", default="experiments/out/cpu_pause_cost")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    prompt = list(range(1, args.prompt + 1))
    engines = {}
    packages = {"djinn_nb": ""} if args.base is None else {args.base: "before ", "djinn_nb": "after "}
    for pkg, label in packages.items():
        Engine = importlib.import_module(f"{pkg}.core.engine").Engine
        for spec in args.models.split(","):
            shape, layers = spec.split(":")
            engines[label + spec] = Engine(build(shape, int(layers)), None, spec)
    rng = random.Random(0)
    load = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    results = measure(engines, args.rounds, args.new_tokens, prompt, rng)
    load.append(os.getloadavg()[0])
    out = {"what": "per decoding step, us (wall; cpu: thread CPU time): armed (pause+resume at every step) minus plain, medians per round",
           "prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "rounds": args.rounds,
           "load_average_1min": load, "seconds": round(time.perf_counter() - t0, 1),
           "environment": environment("cpu", "float32"), "base": args.base, "models": results}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / f"cpu_pause_cost{args.tag}.json", out)
    print(f"load {load[0]:.2f} -> {load[1]:.2f}; {args.rounds} rounds x {args.new_tokens} tokens")
    for spec, r in results.items():
        for kind in ("wall", "cpu"):
            k = r[kind]
            x, a = k["extra_us_per_pause"], k["adjacent_extra_us_per_pause"]
            print(f"  {spec:21s} {kind:4s} plain {k['plain_step_us']['median']:7.1f} us/step; per pause "
                  f"{x['median']:+6.1f} us (IQR {x['p25']:+.1f}..{x['p75']:+.1f}, {k['extra_pct']:+.2f}%); "
                  f"adjacent {a['median']:+6.1f} (IQR {a['p25']:+.1f}..{a['p75']:+.1f}); same tokens {r['same_tokens']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
