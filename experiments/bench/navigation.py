"""Rewind to a decoding step vs that step itself (issue 11's goal: <= 1.2x), in paired rounds.

    python -m experiments.bench.navigation --model random:gpt2 --device cuda:0 --out DIR

One finished greedy generation is the source. For a decoding step k and the
middle layer, each round measures, in a shuffled order:

- ``rewind``: ``engine.rewind(source, step=k, layer)`` from the call until the new
  run's paused activation is ready (device synchronized): validation, the KV cache
  cropped to step k (views, no copy), the new run, and step k's forward up to the
  layer, paused.
- ``step``: the same work done by generating: a fresh run with a breakpoint at
  (layer, k), timed from the start of step k (the stepper's ``between_steps``
  call, where no device work is in flight: step k-1's token has been read back)
  until its pause at the layer is ready (synchronized). Both include the pause.

Reported: the median over rounds of rewind / step with its 25th-75th
percentiles; the full decoding step (median of adjacent token times of a plain
run) for scale; and a check that the rewound run's activation equals the fresh
pause's bit for bit and resumes to the source's tokens.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from djinn_nb.core.engine import Engine
from djinn_nb.core.models import load_model

from ..exp3_whitebox.exp3lib.cli import add_generation_args
from ..exp3_whitebox.exp3lib.env import environment, model_dtype, write_json
from ..exp3_whitebox.exp3lib.timing import sync


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_args(p)
    p.add_argument("--steps", default="", help="decoding steps to rewind to, comma-separated (default: N/2 and N-1)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--min-rounds", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop adding rounds after this long")
    p.add_argument("--out", default="experiments/out/navigation")
    args = p.parse_args(argv)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    engine = Engine(loaded.model, loaded.tokenizer, args.model)
    layer = engine.num_layers // 2
    n = args.new_tokens
    steps = [int(s) for s in args.steps.split(",") if s] or sorted({n // 2, n - 1})
    prompt = torch.randint(0, engine.info()["vocab_size"], (args.seq,), generator=torch.Generator().manual_seed(0)).tolist()

    marks: list[float] = []
    scheduler = engine.stepper.between_steps

    def mark(run):  # noqa: ANN001 - the stepper's hook between two steps of one advance
        scheduler(run)
        marks.append(time.perf_counter())

    engine.stepper.between_steps = mark
    engine.close(engine.generate(prompt, n).id)  # warm-up
    source = engine.generate(prompt, n)
    full = [b - a for a, b in zip(source.token_times[1:], source.token_times[2:])]

    def rewind(k: int) -> float:
        sync()
        t0 = time.perf_counter()
        run = engine.rewind(source.id, k, layer, "resid_post")
        sync()
        dt = time.perf_counter() - t0
        engine.close(run.id)
        return dt

    def step(k: int) -> float:
        marks.clear()
        run = engine.generate(prompt, n, breakpoints=[(layer, k)])
        sync()
        dt = time.perf_counter() - marks[-1]
        assert run.paused and run.checkpoint.step == k and len(marks) == k
        engine.close(run.id)
        return dt

    checks = {}
    for k in steps:
        fresh = engine.generate(prompt, n, breakpoints=[(layer, k)])
        back = engine.rewind(source.id, k, layer, "resid_post")
        same = torch.equal(engine.activation(fresh.id), engine.activation(back.id))
        while back.paused:
            engine.resume(back.id)
        checks[k] = {"activation_equal": same, "tokens_equal_source": back.token_ids == source.token_ids}
        engine.close(fresh.id)
        engine.close(back.id)

    times: dict[tuple[str, int], list[float]] = {(what, k): [] for what in ("rewind", "step") for k in steps}
    jobs = [(what, k) for what, k in times]
    rng = random.Random(0)
    started = time.perf_counter()
    for i in range(args.rounds + 2):
        if i >= args.min_rounds + 2 and time.perf_counter() - started > args.max_seconds:
            break
        rng.shuffle(jobs)
        for what, k in jobs:
            dt = rewind(k) if what == "rewind" else step(k)
            if i >= 2:
                times[(what, k)].append(dt * 1e3)
    engine.stepper.between_steps = scheduler
    rounds = len(times[jobs[0]])
    out = {"model": args.model, "dtype": args.dtype, "layer": layer, "seq_len": args.seq, "new_tokens": n,
           "rounds": rounds, "environment": environment(args.device, model_dtype(args.dtype, args.device, args.model)),
           "full_decoding_step_ms_median": statistics.median(full) * 1e3, "steps": {}}
    print(f"{args.model}: layer {layer}, {rounds} rounds; full decoding step {out['full_decoding_step_ms_median']:.2f} ms")
    for k in steps:
        ratios = sorted(a / b for a, b in zip(times[("rewind", k)], times[("step", k)]))
        q = statistics.quantiles(ratios, n=4)
        out["steps"][str(k)] = {
            "rewind_ms_median": statistics.median(times[("rewind", k)]),
            "step_to_layer_ms_median": statistics.median(times[("step", k)]),
            "ratio_median": statistics.median(ratios), "ratio_p25": q[0], "ratio_p75": q[2],
            **checks[k],
        }
        s = out["steps"][str(k)]
        print(f"  step {k}: rewind {s['rewind_ms_median']:.2f} ms, the step up to layer {layer} "
              f"{s['step_to_layer_ms_median']:.2f} ms: {s['ratio_median']:.3f}x (p25..p75 {q[0]:.3f}..{q[2]:.3f}); "
              f"activation equal {s['activation_equal']}, tokens equal {s['tokens_equal_source']}")
    engine.close(source.id)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tag = args.model.replace(":", "_") + (f"_{args.dtype}" if args.dtype else "")
    write_json(Path(args.out) / f"bench_navigation_{tag}.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
