"""How much host work a pause adds, counted instead of timed: function calls per step, by model depth.

    PYTHONPATH=. python -m experiments.probes.cpu_pause_calls [--base djinn_nb_base] --out DIR

Timing a few tens of microseconds inside a 3 ms step on a shared 2-core machine is
noisy; counting is not. A ``sys.setprofile`` hook counts the Python function calls
and C calls the interpreter makes in each decoding step (from one token taken to the
next) of a plain generation and of one paused at (middle layer, every step) and
resumed in-process at once. Armed minus plain is the host work a pause adds, in
calls: the same number for 12 and 32 blocks means nothing on the pause path walks
the layers. Also the calls from the stop raised in the model's forward to the first
block run by hand after ``resume`` (the pause's gap). Python calls (``call``) and C
functions called from Python (``c_call``) are reported apart.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
from pathlib import Path

import torch

from .cpu_pause_cost import build
from ..exp3_whitebox.exp3lib.env import environment, write_json


class Counter:
    """Counts profile events; ``marks`` records the counts at labelled moments."""

    def __init__(self) -> None:
        self.calls = self.c_calls = 0
        self.marks: list[tuple[str, int, int]] = []

    def __call__(self, _frame, event: str, _arg) -> None:
        if event == "call":
            self.calls += 1
        elif event == "c_call":
            self.c_calls += 1

    def mark(self, label: str) -> None:
        self.marks.append((label, self.calls, self.c_calls))


def count(pkg: str, spec: str, n: int, prompt: list[int]) -> dict:
    Engine = importlib.import_module(f"{pkg}.core.engine").Engine
    Trace = importlib.import_module(f"{pkg}.core.pause").Trace
    shape, layers = spec.split(":")
    engine = Engine(build(shape, int(layers)), None, spec)
    layer = engine.num_layers // 2
    c = Counter()
    take = engine.stepper.take_tokens
    engine.stepper.take_tokens = lambda runs, logits: (c.mark("take"), take(runs, logits))[1]
    nxt = engine.anatomy.blocks[layer + 1]
    nxt.register_forward_pre_hook(lambda *_: c.mark("next"))
    seen = Trace._seen

    def _seen(self, value):
        if self.stop:
            c.mark("raise")
        return seen(self, value)

    out = {}
    for mode in ("plain", "armed"):
        engine.generate(prompt, 4, breakpoints=[(layer, "all")] if mode == "armed" else None)  # warm
        c.marks.clear()
        Trace._seen = _seen
        sys.setprofile(c)
        try:
            run = engine.generate(prompt, n, breakpoints=[(layer, "all")] if mode == "armed" else None)
            while run.paused:
                engine.resume(run.id)
        finally:
            sys.setprofile(None)
            Trace._seen = seen
        takes = [m for m in c.marks if m[0] == "take"]
        per_step = [(b[1] - a[1], b[2] - a[2]) for a, b in zip(takes[1:], takes[2:])]  # decoding steps
        out[mode] = {"calls": statistics.median(p[0] for p in per_step),
                     "c_calls": statistics.median(p[1] for p in per_step)}
        if mode == "armed":
            gaps = [(b[1] - a[1], b[2] - a[2]) for a, b in zip(c.marks, c.marks[1:])
                    if a[0] == "raise" and b[0] == "next"]
            out["gap"] = {"calls": statistics.median(g[0] for g in gaps),
                          "c_calls": statistics.median(g[1] for g in gaps)}
    out["extra_per_step"] = {k: out["armed"][k] - out["plain"][k] for k in ("calls", "c_calls")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2-tiny:12,gpt2-tiny:32,llama-tiny:12,llama-tiny:32")
    p.add_argument("--base", default=None, help="also count this package (e.g. djinn_nb_base)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out", default="experiments/out/cpu_pause_calls")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    prompt = list(range(1, 17))
    packages = ["djinn_nb"] if args.base is None else [args.base, "djinn_nb"]
    results = {pkg: {spec: count(pkg, spec, args.new_tokens, prompt) for spec in args.models.split(",")}
               for pkg in packages}
    out = {"what": "profile events per decoding step (median), armed at the middle layer every step vs plain",
           "new_tokens": args.new_tokens, "environment": environment("cpu", "float32"), "results": results}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / "cpu_pause_calls.json", out)
    for pkg, per in results.items():
        for spec, r in per.items():
            x, g = r["extra_per_step"], r["gap"]
            print(f"  {pkg:14s} {spec:14s} plain {r['plain']['calls']:6.0f} py + {r['plain']['c_calls']:5.0f} C calls/step;"
                  f" a pause adds {x['calls']:+5.0f} py {x['c_calls']:+5.0f} C; raise->next block {g['calls']:4.0f} py"
                  f" {g['c_calls']:4.0f} C")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
