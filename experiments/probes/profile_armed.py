"""Where an armed step's extra host time goes: plain and armed generations under cProfile, per function.

    python -m experiments.probes.profile_armed --model random:gpt2 --device cuda:0 --dtype float32 --out DIR

First times whole generations (alternating plain / armed at the middle layer at every step,
resumed in-process, as ``experiments/bench/armed.py``'s ``armed``) for the extra time per pause; then runs
each under cProfile (alternating too, one profiler per kind) and lists, per function, its own time per step in the armed runs less
that in the plain runs, and the calls per step it adds: the rows at the top are what a pause
adds, those at the bottom what the hand-run continuation saves (HF's output handling, say).
cProfile slows Python calls several-fold, so the per-function figures rank; the timed
generations give the size. Writes ``profile_armed_<model>.txt`` and ``.json``.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from pathlib import Path

import torch

from ..exp3_whitebox.exp3lib.cli import add_generation_args
from ..exp3_whitebox.exp3lib.env import environment, model_dtype, write_json
from ..exp3_whitebox.exp3lib.timing import sync


def _own_times(profile: cProfile.Profile) -> dict[tuple, tuple[int, float]]:
    stats = pstats.Stats(profile).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    return {k: (v[1], v[2]) for k, v in stats.items()}


def main(argv: list[str] | None = None) -> int:
    from djinn_nb.core.engine import Engine
    from djinn_nb.core.models import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_args(p)
    p.add_argument("--rounds", type=int, default=20, help="timed rounds (one plain and one armed generation each)")
    p.add_argument("--profiled", type=int, default=10, help="generations of each kind under the profiler")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", default="experiments/out/profile_armed")
    args = p.parse_args(argv)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    engine = Engine(loaded.model, loaded.tokenizer, args.model)
    layer = engine.num_layers // 2
    prompt = torch.randint(0, engine.info()["vocab_size"], (args.seq,), generator=torch.Generator().manual_seed(0)).tolist()
    n = args.new_tokens

    def plain() -> None:
        engine.close(engine.generate(prompt, n).id)

    def armed() -> None:
        run = engine.generate(prompt, n, breakpoints=[(layer, "all")])
        while run.paused:
            engine.resume(run.id)
        engine.close(run.id)

    kinds = {"plain": plain, "armed": armed}
    for f in kinds.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(args.rounds):
        for name in (list(kinds) if i % 2 else list(kinds)[::-1]):
            sync()
            t0 = time.perf_counter()
            kinds[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    step = {k: statistics.median(v) / n * 1e6 for k, v in times.items()}
    extra = statistics.median(a - b for a, b in zip(times["armed"], times["plain"])) / n * 1e6
    profiles = {name: cProfile.Profile() for name in kinds}
    for i in range(args.profiled):  # alternating, as the timed rounds: drift between kinds cancels
        for name in (list(kinds) if i % 2 else list(kinds)[::-1]):
            profiles[name].enable()
            kinds[name]()
            sync()
            profiles[name].disable()
    own = {name: _own_times(prof) for name, prof in profiles.items()}
    steps = args.profiled * n
    rows = []
    for key in set(own["plain"]) | set(own["armed"]):
        pc, pt = own["plain"].get(key, (0, 0.0))
        ac, at = own["armed"].get(key, (0, 0.0))
        where = f"{Path(key[0]).name}:{key[1]}({key[2]})"
        rows.append({"function": where, "us_per_step": (at - pt) / steps * 1e6, "calls_per_step": (ac - pc) / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    lines = [f"{args.model} {args.dtype or ''} on {args.device}: plain {step['plain']:.0f} us/step, armed "
             f"{step['armed']:.0f} us/step; a pause adds {extra:+.1f} us ({extra / step['plain'] * 100:+.2f} %), "
             f"median of {args.rounds} paired rounds",
             "own time per step under cProfile, armed less plain (profiler-inflated; for ranking):"]
    lines += [f"  {r['us_per_step']:+8.2f} us  {r['calls_per_step']:+6.2f} calls  {r['function']}" for r in rows[:args.top]]
    lines.append("  ...")
    lines += [f"  {r['us_per_step']:+8.2f} us  {r['calls_per_step']:+6.2f} calls  {r['function']}" for r in rows[-args.top // 2:]]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.model.replace(":", "_") + (f"_{args.dtype}" if args.dtype else "")
    (out / f"profile_armed_{tag}.txt").write_text(text + "\n")
    write_json(out / f"profile_armed_{tag}.json", {
        "model": args.model, "dtype": args.dtype, "layer": layer, "new_tokens": n, "rounds": args.rounds,
        "us_per_step_median": step, "extra_us_per_pause_median": extra, "rows": rows,
        "environment": environment(args.device, model_dtype(args.dtype, args.device, args.model))})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
