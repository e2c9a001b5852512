"""Decoding steps: djinn_nb's eager path against HF ``generate`` and a CUDA-graphed static-cache step.

    python -m experiments.bench.decoding --model random:gpt2 --dtype float32 --seq 128 --new-tokens 128 --out DIR

The baseline for graphed decoding (issue 25), in one process on one random model: plain greedy
generation of ``--new-tokens`` after a ``--seq``-token prompt, per decoding step (the prompt pass
left out: each variant's time for ``n`` tokens less its time for one, over ``n - 1``):

- ``djinn_eager``: ``Engine.generate`` with no breakpoint (today's path);
- ``hf_dynamic``: ``model.generate`` with its dynamic cache, eager;
- ``hf_static``: ``model.generate(cache_implementation="static")``, eager;
- ``graphed_static``: a static cache and one decoding step captured as a CUDA graph by hand
  (what issue 25 would build on: each step copies the token and position in and replays),
  its tokens checked against ``hf_static``'s;
- the floor: the weights' bytes over the card's memory bandwidth (``--bandwidth``, H200: 4.8e12 B/s).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import torch

from djinn_nb.core.engine import Engine
from djinn_nb.core.models import load_model

from ..exp3_whitebox.exp3lib.cli import add_generation_args
from ..exp3_whitebox.exp3lib.env import environment, model_dtype, write_json
from ..exp3_whitebox.exp3lib.timing import stats, sync


def _per_step(run: Callable[[int], Any], new_tokens: int, repeats: int) -> tuple[float, Any]:
    """Median ms per decoding step: (time of ``new_tokens`` − time of 1) / (new_tokens − 1)."""
    out = run(new_tokens)  # warm-up (and the tokens)
    run(1)
    longs: list[float] = []
    shorts: list[float] = []
    for _ in range(repeats):
        for n, into in ((new_tokens, longs), (1, shorts)):
            sync()
            t0 = time.perf_counter()
            run(n)
            sync()
            into.append((time.perf_counter() - t0) * 1e3)
    return (stats(longs).median_ms - stats(shorts).median_ms) / (new_tokens - 1), out


def _graphed_static(model: Any, prompt: torch.Tensor, new_tokens: int) -> Callable[[int], list[int]]:
    """Greedy decoding with a static cache, each step one CUDA graph replay (captured once)."""
    from transformers import StaticCache

    device = prompt.device
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens + 1)
    token = torch.zeros((1, 1), dtype=torch.long, device=device)
    position = torch.zeros((1,), dtype=torch.long, device=device)

    def step() -> torch.Tensor:
        return model(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True).logits[:, -1]

    with torch.inference_mode():
        model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(prompt.shape[1], device=device))
        position.fill_(prompt.shape[1])
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()

    def run(n: int) -> list[int]:
        with torch.inference_mode():
            cache.reset()
            first = model(input_ids=prompt, past_key_values=cache,
                          cache_position=torch.arange(prompt.shape[1], device=device)).logits[:, -1]
            ids = [first.argmax(-1)]
            for i in range(n - 1):
                token.copy_(ids[-1].view(1, 1))
                position.fill_(prompt.shape[1] + i)
                graph.replay()
                ids.append(logits.argmax(-1))
            return torch.cat(ids).tolist()

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_args(p, new_tokens=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="the card's memory bandwidth, bytes/s")
    p.add_argument("--out", default="experiments/out/decoding")
    args = p.parse_args(argv)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model = loaded.model
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.seq,), generator=gen).tolist()
    prompt = torch.tensor([ids], device=args.device)
    engine = Engine(model, loaded.tokenizer, args.model)

    def djinn(n: int) -> list[int]:
        run = engine.generate(ids, n)
        tokens = run.token_ids[len(ids):] if len(run.token_ids) > n else run.token_ids
        engine.close(run.id)
        return list(tokens)

    def hf(cache: str | None) -> Callable[[int], list[int]]:
        def run(n: int) -> list[int]:
            with torch.inference_mode():
                kw: dict[str, Any] = {"cache_implementation": cache} if cache else {}
                out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,  # type: ignore[operator]
                                     pad_token_id=0, **kw)
            return out[0, len(ids):].tolist()
        return run

    variants: dict[str, Callable[[int], list[int]]] = {
        "djinn_eager": djinn, "hf_dynamic": hf(None), "hf_static": hf("static")}
    errors: dict[str, str] = {}
    if torch.device(args.device).type == "cuda":
        try:
            variants["graphed_static"] = _graphed_static(model, prompt, args.new_tokens)
        except Exception as e:  # noqa: BLE001 - recorded: whether HF's step captures is part of the answer
            errors["graphed_static"] = f"{type(e).__name__}: {e}"[:500]
    per_step, tokens = {}, {}
    for name, fn in variants.items():
        try:
            per_step[name], tokens[name] = _per_step(fn, args.new_tokens, args.repeats)
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"[:500]
    weight_bytes = sum(int(t.numel()) * t.element_size() for t in model.parameters())
    floor_ms = weight_bytes / args.bandwidth * 1e3
    ref = tokens.get("hf_static")
    out = {
        "benchmark": "per decoding step, greedy, after a prompt pass (prompt pass excluded)",
        "model": args.model, "seq_len": args.seq, "new_tokens": args.new_tokens,
        "environment": environment(args.device, model_dtype(args.dtype, args.device, args.model)),
        "per_step_ms": per_step,
        "bandwidth_floor_ms": floor_ms, "weight_bytes": weight_bytes, "bandwidth_bytes_per_s": args.bandwidth,
        "over_floor": {k: v / floor_ms for k, v in per_step.items()},
        "tokens_equal_hf_static": {k: v == ref for k, v in tokens.items()} if ref is not None else None,
        "errors": errors,
    }
    dtype = out["environment"].get("dtype", "")
    name = f"decoding_{args.model.replace(':', '_')}_{dtype}.json"
    write_json(Path(args.out) / name, out)
    print(f"{args.model} {dtype}: " + ", ".join(f"{k} {v:.3f} ms/step ({v / floor_ms:.1f}x floor)" for k, v in per_step.items())
          + f"; floor {floor_ms:.3f} ms; tokens equal hf_static: {out['tokens_equal_hf_static']}; errors: {errors}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
