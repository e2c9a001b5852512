"""The per-step batch form against plain generation and a pause at every step (issue 21, item 4).

    python -m experiments.bench.step_through --model random:gpt2 --dtype float32 --out DIR

Through the client to a ``djinn-server`` child process on loopback, per round, interleaved:
(a) ``generate(prompt, n)`` with no breakpoint (plain generation, the floor);
(b) ``generate`` paused at (layer, step 0), then ``step_through(n, scale=s)`` — the same edit at
    every step on the server, then the run's end;
(c) the same edits made from the client: a breakpoint at (layer, "all") and ``resume(scale=s)``
    at each step (one round trip per step).
Medians of ``--rounds``; goal: (b) within 2 % of (a). (b)'s tokens are checked equal to (c)'s.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Callable


import djinn_nb

from ..exp3_whitebox.exp3lib.cli import add_model_args
from ..exp3_whitebox.exp3lib.env import environment, write_json
from ..harness.server_process import djinn_server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", default="experiments/out/step_through")
    a = p.parse_args(argv)
    n, scale = a.tokens, 0.9
    with djinn_server(a.model, a.device, a.dtype) as address:
        client = djinn_nb.connect(address)
        vocab = int(client.info.get("vocab_size") or 1000)
        prompt = [(31 * i + 7) % (min(vocab, 50000) - 10) + 10 for i in range(a.prompt)]

        def plain() -> list[int]:
            return _closed(client.generate(prompt, max_new_tokens=n))

        def batch_form() -> list[int]:
            run = client.generate(prompt, max_new_tokens=n, breakpoints=[(a.layer, 0)])
            run.step_through(n, scale=scale)
            return _closed(run)

        def per_step() -> list[int]:
            run = client.generate(prompt, max_new_tokens=n, breakpoints=[{"layer": a.layer, "step": "all"}])
            while run.paused:
                run.resume(scale=scale)
            return _closed(run)

        cases: dict[str, Callable[[], list[int]]] = {"plain": plain, "step_through": batch_form, "per_step_pause": per_step}
        tokens = {name: fn() for name, fn in cases.items()}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(a.rounds):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
        dtype = client.info.get("dtype")
        client.close()
    med = {name: statistics.median(v) for name, v in times.items()}
    out: dict[str, Any] = {
        "environment": environment(a.device, dtype), "model": a.model, "layer": a.layer, "new_tokens": n,
        "prompt_positions": a.prompt, "rounds": a.rounds, "median_ms": med,
        "step_through_over_plain": med["step_through"] / med["plain"],
        "per_step_pause_over_plain": med["per_step_pause"] / med["plain"],
        "step_through_tokens_equal_per_step_pause": tokens["step_through"] == tokens["per_step_pause"],
        "goal": "step_through <= 1.02 x plain"}
    print(out)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    name = f"step_through_{a.model.replace(':', '_').replace('/', '_')}_{out['environment']['dtype']}.json"
    write_json(Path(a.out) / name, out)
    return 0


def _closed(run: Any) -> list[int]:
    ids = list(run.token_ids)
    run.close()
    return ids


if __name__ == "__main__":
    raise SystemExit(main())
