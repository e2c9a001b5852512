"""What handing the device on inside a long step costs when no one waits, and while others do (issue 22).

    python -m experiments.bench.turns --model random:llama-7b --dtype bfloat16 --out DIR

An ``Engine`` in this process. For prompts of ``--lengths`` tokens, interleaved per round:
``generate(prompt, 1)`` (the prompt pass and one token) (a) as the model's own forward (the split
off: ``SLICE_TOKENS`` raised past the prompt), (b) split between blocks as a long step is (no one
waiting), (c) split inside each block too (as while others wait: ``contended`` forced on); and
``lens_grid(prompt)`` split and not. Medians; goal: (b) within 2 % of (a). The split is exact: each
variant's logits are compared bit for bit with (a)'s.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from djinn_nb.core import stepping
from djinn_nb.core.engine import Engine
from djinn_nb.core.models import load_model
from djinn_nb.core.threads import apply_thread_setting

from ..exp3_whitebox.exp3lib.cli import add_model_args
from ..exp3_whitebox.exp3lib.env import environment, write_json
from ..exp3_whitebox.exp3lib.timing import sync


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", default="experiments/out/turns")
    a = p.parse_args(argv)
    apply_thread_setting()
    loaded = load_model(a.model, device=a.device, dtype=a.dtype)
    engine = Engine(loaded.model, tokenizer=loaded.tokenizer)
    vocab = int(loaded.model.config.vocab_size)
    stepper, default = engine.stepper, stepping.SLICE_TOKENS
    rows: dict[str, Any] = {}

    def variant(split: bool, halves: bool) -> None:
        stepping.SLICE_TOKENS = default if split else 1 << 30
        stepper.contended = (lambda: True) if halves else (lambda: False)

    for n in a.lengths:
        prompt = [(31 * i + 7) % (vocab - 10) + 10 for i in range(n)]

        def gen(prompt: list[int] = prompt) -> torch.Tensor:
            run = engine.generate(prompt, max_new_tokens=1, record_logits=True)
            logits = run.logits[0]
            engine.close(run.id)
            return logits

        cases: dict[str, tuple[bool, bool, Callable[[], Any]]] = {
            "model_forward": (False, False, gen), "split_between_blocks": (True, False, gen),
            "split_inside_blocks": (True, True, gen),
            "lens_grid_unsplit": (False, False, lambda prompt=prompt: engine.lens_grid(prompt, 1)),
            "lens_grid_split": (True, False, lambda prompt=prompt: engine.lens_grid(prompt, 1)),
        }
        logits = {}
        for name, (split, halves, fn) in cases.items():
            variant(split, halves)
            out = fn()
            if name in ("model_forward", "split_between_blocks", "split_inside_blocks"):
                logits[name] = out
            fn()  # warm
        same = {k: bool(torch.equal(v, logits["model_forward"])) for k, v in logits.items()}
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(a.rounds):
            for name, (split, halves, fn) in cases.items():
                variant(split, halves)
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows[str(n)] = {"median_ms": med, "logits_equal_model_forward": same,
                        "split_over_model_forward": med["split_between_blocks"] / med["model_forward"],
                        "inside_over_model_forward": med["split_inside_blocks"] / med["model_forward"],
                        "lens_grid_split_over_unsplit": med["lens_grid_split"] / med["lens_grid_unsplit"]}
        print(n, rows[str(n)], flush=True)
    variant(True, False)
    stepper.take_turns(engine.device_turn())
    out = {"benchmark": "the cost of handing the device on inside a long step", "model": a.model,
           "environment": environment(engine.device, engine.dtype), "slice_tokens": default, "rounds": a.rounds,
           "layers": engine.num_layers, "lengths": rows, "goal": "split_between_blocks within 2 % of model_forward"}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(a.out) / f"turns_{a.model.replace(':', '_').replace('/', '_')}_{out['environment']['dtype']}.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
