"""Where ``fork_many``'s time goes, from the engine to the client (a profiling aid, not a benchmark).

    python -m experiments.probes.profile_fork_many --model random:gpt2 --device cuda:0 --out DIR

Times, interleaved, in one process:

- ``graph_replay``: the batch's captured layers replayed alone (the issue's floor: the batched
  remaining layers as one CUDA graph; on a CPU, ``continue_from`` on the stacked starts);
- ``engine_fork_many``: ``Engine.fork_many`` (its forks are closed untimed);
- ``client_fork_many`` and ``client_fork``: through an embedded server on loopback.

Then cProfiles (top functions by own and cumulative time) of the engine call, of the server's
side of the client call (``DebugCalls.fork_many`` wrapped in the server's thread) and of the
client's side. Everything lands in ``DIR/profile_fork_many_<model>_<dtype>.txt`` and ``.json``.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

import djinn_nb
from djinn_nb.client import connection
from djinn_nb.core import kvcache
from djinn_nb.core.engine import ForkSpec
from djinn_nb.core.specs import Edit
from djinn_nb.serving import debug_calls

from ..exp3_whitebox.exp3lib.env import environment, model_dtype, write_json


def _timed(cases: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median ms of each case, interleaved; what a case returns is closed after its timing."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(repeats + 3):
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            made = fn()
            sync()
            if i >= 3:
                times[name].append((time.perf_counter() - t0) * 1e3)
            for run in made or []:
                run.close()
    return {k: statistics.median(v) for k, v in times.items()}


def _stats(prof: cProfile.Profile, title: str, n: int = 30) -> str:
    out = io.StringIO()
    out.write(f"===== {title}: by own time\n")
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(n)
    out.write(f"===== {title}: by cumulative time\n")
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(n)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--forks", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="experiments/out/probes")
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    server_prof = cProfile.Profile()
    profiling = {"on": False}
    inner = debug_calls.DebugCalls.fork_many

    @functools.wraps(inner)
    def profiled(self: Any, *a: Any, **k: Any) -> Any:
        if not profiling["on"]:
            return inner(self, *a, **k)
        server_prof.enable()
        try:
            return inner(self, *a, **k)
        finally:
            server_prof.disable()

    debug_calls.DebugCalls.fork_many = profiled  # type: ignore[method-assign]
    client = djinn_nb.connect(embedded=True, model=args.model, device=args.device, dtype=args.dtype)
    engine = next(iter(connection._embedded.values())).state.engine  # noqa: SLF001 - the embedded server's
    vocab = client.info["vocab_size"]
    prompt = torch.randint(0, vocab, (args.seq,), generator=torch.Generator().manual_seed(0)).tolist()
    scales = [1.0 + 0.01 * i for i in range(args.forks)]
    parent = client.generate(prompt, max_new_tokens=1, breakpoints=[args.layer])
    eparent = engine.generate(prompt, 1, breakpoints=[args.layer])
    specs = [ForkSpec(Edit(scale=s), [], None) for s in scales]

    class _Closing:  # an engine run, closed as the client's are
        def __init__(self, run: Any):
            self.run = run

        def close(self) -> None:
            engine.close(self.run.id)

    def engine_many() -> list[Any]:
        return [_Closing(r) for r in engine.fork_many(eparent.id, specs)]

    def client_many() -> list[Any]:
        return parent.fork_many([{"scale": s, "breakpoints": []} for s in scales])

    def client_one() -> list[Any]:
        return [parent.fork(scale=1.0, breakpoints=[])]

    def closing(fn: Callable[[], list[Any]]) -> None:
        for r in fn():
            r.close()

    for _ in range(3):  # capture the graphs
        closing(engine_many)
        closing(client_many)
    cp = eparent.checkpoint
    graph = cp.graphs.batched.get(args.forks)
    start = torch.cat([cp.hidden] * args.forks)

    def floor() -> None:
        if graph is not None:
            with torch.inference_mode():
                graph.replay(start)
            return None
        cache = kvcache.fork_cache(eparent.cache)
        cache.batch_repeat_interleave(args.forks)
        a = kvcache.swap_cache(cp.args, eparent.cache, cache)
        kw = kvcache.swap_cache(cp.kwargs, eparent.cache, cache)
        with torch.inference_mode():
            engine.stepper.continue_from(cp.layer, cp.site, start, a, kw, {})
        return None

    medians = _timed({"graph_replay": floor, "engine_fork_many": engine_many, "client_fork_many": client_many,
                      "client_fork": client_one}, args.repeats, sync)
    report = [f"{k:20s} {v:8.3f} ms" for k, v in medians.items()]
    report.append(f"graph captured for {args.forks} rows: {graph is not None} "
                  f"(disabled: {cp.graphs.batched_disabled})")
    print("\n".join(report), flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        closing(engine_many)
    sync()
    prof.disable()
    texts = [_stats(prof, "Engine.fork_many x10")]
    if cuda:  # the device's side: how much of a call the GPU is busy
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tprof:
            for _ in range(5):
                closing(engine_many)
            sync()
        events = tprof.key_averages()
        busy = sum(getattr(e, "self_device_time_total", 0) for e in events) / 5 / 1e3
        medians["engine_gpu_busy_per_call"] = busy
        report.append(f"GPU busy per engine fork_many: {busy:.3f} ms (kernels' own time, summed)")
        texts.append("===== torch.profiler, Engine.fork_many x5, by the device's own time\n"
                     + events.table(sort_by="self_cuda_time_total", row_limit=25))
    profiling["on"] = True  # the server's side alone (one profiler at a time on Python >= 3.12)
    for _ in range(10):
        closing(client_many)
    profiling["on"] = False
    texts.append(_stats(server_prof, "server side of client fork_many x10"))
    client_prof = cProfile.Profile()
    client_prof.enable()
    for _ in range(10):
        closing(client_many)
    client_prof.disable()
    texts.append(_stats(client_prof, "client and server (one process) of client fork_many x10"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"profile_fork_many_{args.model.replace(':', '_').replace('/', '_')}_{args.dtype or 'default'}"
    (out / f"{name}.txt").write_text("\n".join(report) + "\n\n" + "\n".join(texts))
    write_json(out / f"{name}.json", {
        "what": "fork_many's time from engine to client, in one process (experiments/probes/profile_fork_many.py)",
        "model": args.model, "layer": args.layer, "seq_len": args.seq, "forks": args.forks,
        "environment": environment(args.device, model_dtype(args.dtype, args.device, args.model)),
        "median_ms": medians, "graph_captured": graph is not None,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
