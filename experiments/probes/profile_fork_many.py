"""Where ``fork_many``'s time goes, in-process (a profiling aid for issue 10, not a benchmark).

    python -m experiments.probes.profile_fork_many --model random:gpt2 --device cuda:0

Times, interleaved: one fork; ``fork_many`` of ``--forks``; and the floor, the batched
remaining layers alone (``continue_from`` on the stacked starts, nothing else). Then a
cProfile of ``fork_many`` (top functions by own time).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

from djinn_nb.core import kvcache
from djinn_nb.core.engine import Engine, ForkSpec
from djinn_nb.core.models import load_model
from djinn_nb.core.specs import Edit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--forks", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    engine = Engine(loaded.model, loaded.tokenizer, args.model)
    prompt = torch.randint(0, engine.info()["vocab_size"], (args.seq,), generator=torch.Generator().manual_seed(0)).tolist()
    parent = engine.generate(prompt, 1, breakpoints=[args.layer])
    specs = [ForkSpec(Edit(scale=1 + 0.01 * i), [], None) for i in range(args.forks)]
    cp = parent.checkpoint
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)

    def one() -> None:
        engine.close(engine.fork(parent.id, Edit(scale=1.0), []).id)

    def many() -> None:
        for r in engine.fork_many(parent.id, specs):
            engine.close(r.id)

    def floor() -> None:
        n = args.forks
        cache = kvcache.fork_cache(parent.cache)
        cache.batch_repeat_interleave(n)
        a = kvcache.swap_cache(cp.args, parent.cache, cache)
        kw = kvcache.swap_cache(cp.kwargs, parent.cache, cache)
        with torch.inference_mode():
            logits = engine.stepper.continue_from(cp.layer, cp.site, torch.cat([cp.hidden] * n), a, kw, {})
            logits.argmax(-1).tolist()

    cases = {"one_fork": one, f"fork_many_{args.forks}": many, "floor_batched_layers_only": floor}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(args.repeats + 3):
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= 3:
                times[name].append((time.perf_counter() - t0) * 1e3)
    for name, ts in times.items():
        print(f"{name:28s} {statistics.median(ts):8.2f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        many()
    sync()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(22)
    print(out.getvalue()[-6000:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
