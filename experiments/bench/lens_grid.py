"""``client.lens_grid`` through a server process against the engine's own and a plain forward (issue 21).

    python -m experiments.bench.lens_grid --model random:llama-7b --dtype bfloat16 --out DIR

The same random weights in this process (an ``Engine`` and, for the floor, a plain HF forward of
the prompt with a cache) and in a ``djinn-server`` child process reached on loopback. In blocks of
five calls, interleaved block by block: ``engine.lens_grid(prompt, k)``, ``client.lens_grid(prompt,
k)``, the plain forward; medians. Goal: the client within 1.1× of the engine (the reply is layers × positions × k ids and
probabilities: KBs). The floor of the engine's own is the plain forward plus a head and top-k
per layer.
"""
from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext
import time
from pathlib import Path

import torch

import djinn_nb
from djinn_nb.core.engine import Engine
from djinn_nb.core.models import load_model
from djinn_nb.core.threads import apply_thread_setting
from djinn_nb.serving.embedded import start_embedded_server

from ..exp3_whitebox.exp3lib.cli import add_model_args
from ..exp3_whitebox.exp3lib.env import environment, write_json
from ..harness.server_process import djinn_server


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--positions", type=int, default=128)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--embedded", action="store_true",
                   help="serve the bench's own engine from this process: the client and the engine it is "
                        "compared with are one engine, so the difference is the call's own cost")
    p.add_argument("--out", default="experiments/out/lens_grid")
    a = p.parse_args(argv)
    apply_thread_setting()  # as djinn-server does, so both sides use the same CPU threads
    embedded = start_embedded_server(a.model, a.device, a.dtype) if a.embedded else None
    if embedded is not None:
        engine = embedded.state.engine
        model = engine.model
    else:
        loaded = load_model(a.model, device=a.device, dtype=a.dtype)
        model = loaded.model
        engine = Engine(model, tokenizer=loaded.tokenizer)
    device = engine.device
    vocab = int(model.config.vocab_size)
    prompt = [(31 * i + 7) % (vocab - 10) + 10 for i in range(a.positions)]
    ids = torch.tensor([prompt], device=device)
    times: dict[str, list[float]] = {"engine": [], "client": [], "plain_forward": []}
    with (nullcontext(embedded.address) if embedded else djinn_server(a.model, a.device, a.dtype)) as address:
        client = djinn_nb.connect(address)
        remote = client.lens_grid(prompt, a.k)
        local_ids, _ = engine.lens_grid(prompt, a.k)
        same = bool(torch.equal(torch.as_tensor(remote["ids"]).cpu(), local_ids.cpu()))

        def plain() -> None:
            from transformers import DynamicCache

            with torch.inference_mode():
                engine.model(input_ids=ids, past_key_values=DynamicCache(config=engine.model.config), use_cache=True)

        steps = {"engine": lambda: engine.lens_grid(prompt, a.k), "client": lambda: client.lens_grid(prompt, a.k),
                 "plain_forward": plain}
        # in blocks, not call by call: two processes' CUDA contexts alternating on one GPU pay a
        # context switch each time, which is the benchmark's cost, not the client's
        block = 5
        for _ in range(2):  # warm-up
            for fn in steps.values():
                fn()
        for _ in range(max(1, a.rounds // block)):
            for name, fn in steps.items():
                for _ in range(block):
                    _sync(device)
                    t0 = time.perf_counter()
                    fn()
                    _sync(device)
                    times[name].append((time.perf_counter() - t0) * 1e3)
        client.close()
    med = {name: statistics.median(v) for name, v in times.items()}
    out = {"environment": environment(device, next(model.parameters()).dtype), "model": a.model,
           "positions": a.positions, "k": a.k, "layers": engine.num_layers, "rounds": a.rounds,
           "median_ms": med, "client_over_engine": med["client"] / med["engine"],
           "engine_over_plain_forward": med["engine"] / med["plain_forward"],
           "client_over_plain_forward": med["client"] / med["plain_forward"], "ids_equal_engine": same,
           "goal": "client <= 1.1 x engine",
           "server": "this process's engine, embedded" if embedded else "a djinn-server child process"}
    if embedded is not None:
        embedded.close()
    print(out)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    tag = "_embedded" if embedded else ""
    write_json(Path(a.out) / f"lens_grid{tag}_{a.model.replace(':', '_').replace('/', '_')}_{out['environment']['dtype']}.json",
               out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
