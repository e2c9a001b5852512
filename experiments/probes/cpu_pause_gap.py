"""The host time of one pause and resume, two versions of djinn_nb in one process (CPU).

    PYTHONPATH=/tmp/base python -m experiments.probes.cpu_pause_gap --out DIR   (the base package: see cpu_armed_ab.py)

Timestamps at the hand-offs of a breakpoint paused and resumed at every step:
the stop raised in the model's forward (a Trace hook), and the next block
starting by hand after ``resume``; the median of that gap over every pause is
the host work between the two (the issue's "+85-100 us per pause" on the H100
host). Also the setup of an armed step (from the step loop's hand-over between
two steps until block 0 starts) against a plain step's. Versions alternate generation by
generation; medians over all pauses are robust to the machine's noise.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time
from pathlib import Path

import torch

from djinn_nb.core.models import build_random

from .cpu_pause_cost import build
from ..exp3_whitebox.exp3lib.env import environment, write_json


def instrument(pkg: str, log: list):
    eng = importlib.import_module(f"{pkg}.core.engine")
    pause = importlib.import_module(f"{pkg}.core.pause")
    pc = time.perf_counter
    seen = pause.Trace._seen

    def _seen(self, v):
        if self.stop:
            log.append(("raise", pc()))
        return seen(self, v)

    pause.Trace._seen = _seen
    return eng.Engine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="djinn_nb_base", help="the package to compare with")
    p.add_argument("--model", default="gpt2-tiny", help="a random shape, or shape:layers (e.g. llama-tiny:32)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default="experiments/out/cpu_pause_gap")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pc = time.perf_counter
    n, prompt = args.new_tokens, list(range(1, 17))
    engines, logs = {}, {}
    for tag, pkg in (("before", args.base), ("after", "djinn_nb")):
        logs[tag] = []
        Engine = instrument(pkg, logs[tag])
        shape, _, layers = args.model.partition(":")
        model = build(shape, int(layers)) if layers else build_random(shape, seed=0)
        e = Engine(model, None, args.model)
        between = e.stepper.between_steps  # a step's setup: from here to block 0
        e.stepper.between_steps = lambda run, _f=between, _l=logs[tag]: (_l.append(("forward", pc())), _f(run))[1]
        layer = e.num_layers // 2
        log = logs[tag]
        b0, bn = e.anatomy.blocks[0], e.anatomy.blocks[layer + 1]
        f0, fn = b0.forward, bn.forward
        b0.forward = lambda *a, _f=f0, _l=log, **k: (_l.append(("block0", pc())), _f(*a, **k))[1]
        bn.forward = lambda *a, _f=fn, _l=log, **k: (_l.append(("next", pc())), _f(*a, **k))[1]
        engines[tag] = (e, layer)
    gap = {t: [] for t in engines}
    setup = {t: {"plain": [], "armed": []} for t in engines}
    for i in range(args.rounds + 1):
        for tag, (e, layer) in engines.items():
            for mode in ("plain", "armed"):
                log = logs[tag]
                log.clear()
                r = e.generate(prompt, n, breakpoints=[(layer, "all")] if mode == "armed" else None)
                while r.paused:
                    e.resume(r.id)
                e.close(r.id)
                if i == 0:
                    continue
                last: dict[str, float] = {}
                for label, t in log:
                    if label == "block0" and "forward" in last:
                        setup[tag][mode].append((t - last.pop("forward")) * 1e6)
                    if label == "next" and "raise" in last:
                        gap[tag].append((t - last.pop("raise")) * 1e6)
                    if label in ("forward", "raise"):
                        last[label] = t
    out = {"model": args.model, "new_tokens": n, "rounds": args.rounds, "environment": environment("cpu", "float32"),
           "clock": "perf_counter, us; medians over every pause", "versions": {}}
    for tag in engines:
        out["versions"][tag] = {
            "pauses": len(gap[tag]),
            "pause_to_hand_run_us": statistics.median(gap[tag]),
            "armed_step_setup_us": statistics.median(setup[tag]["armed"]),
            "plain_step_setup_us": statistics.median(setup[tag]["plain"]),
        }
        v = out["versions"][tag]
        print(f"{tag:6s}: raise -> next block by hand {v['pause_to_hand_run_us']:.1f} us ({v['pauses']} pauses); "
              f"forward -> block 0: armed {v['armed_step_setup_us']:.1f} us, plain {v['plain_step_setup_us']:.1f} us")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / f"cpu_pause_gap_{args.model.replace(':', '_')}.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
