"""Exactness on the GPU: paused/resumed runs and forks (eager, captured, replayed CUDA graphs)
give exactly the tokens of plain HF generate with the same forward hooks.

    python experiments/gpu_exactness.py --models random:gpt2 random:llama-7b --out DIR

The CPU test suite cannot reach the CUDA-graph path; this script is its test on a GPU.
Exits non-zero on any mismatch.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "exp3_whitebox"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from exp3lib.env import environment, write_json  # noqa: E402
from reference import generate  # noqa: E402  (the test suite's plain-HF reference)

from djinn_nb.engine import Engine  # noqa: E402
from djinn_nb.models import load_model  # noqa: E402


def hf_tokens(model, prompt, n, layer=None, scale=None, call=0):
    """Plain HF generate, optionally scaling block ``layer``'s output on its ``call``-th call."""
    if layer is None:
        return generate(model, prompt, n)
    return generate(model, prompt, n, edit_layer=layer, edit_call=call, edit=lambda h: h * scale)


def check_model(source: str, dtype: str | None, seq: int, n: int) -> dict:
    loaded = load_model(source, device="cuda:0", dtype=dtype)
    model = loaded.model
    engine = Engine(model, loaded.tokenizer, source)
    L = engine.num_layers
    mid = L // 2
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, engine.info()["vocab_size"], (seq,), generator=gen).tolist()
    plain = hf_tokens(model, prompt, n)
    checks = []

    def record(name, got, want, extra=None):
        checks.append({"check": name, "ok": got == want, **(extra or {})})

    run = engine.generate(prompt, n, breakpoints=[L // 4, mid, 3 * L // 4])
    while run.paused:
        engine.resume(run.id)
    record("breakpoints at 25/50/75% resumed unmodified == HF generate", run.token_ids, plain)

    parent = engine.generate(prompt, n, breakpoints=[mid])
    for i, scale in enumerate([0.9, 0.9, 0.9, 0.5, 1.5, 0.9]):
        child = engine.fork(parent.id, edit=_scale(scale), breakpoints=[])
        record(f"fork {i + 1} scale {scale} == HF hook", child.token_ids, hf_tokens(model, prompt, n, mid, scale),
               {"continued_by": child.continued_by})
        engine.close(child.id)
    slot = parent.checkpoint.graphs
    engine.resume(parent.id)
    record("parent resumed after forks == HF generate", parent.token_ids, plain)

    step_parent = engine.generate(prompt, n, breakpoints=[(mid, 3)])
    for i in range(4):
        child = engine.fork(step_parent.id, edit=_scale(0.5), breakpoints=[])
        record(f"decode-step fork {i + 1} (layer {mid}, step 3) == HF hook on 4th call", child.token_ids,
               hf_tokens(model, prompt, n, mid, 0.5, call=3), {"continued_by": child.continued_by})
    return {
        "model": source,
        "dtype": str(engine.dtype),
        "seq_len": seq,
        "new_tokens": n,
        "cuda_graphs_enabled": engine.cuda_graphs,
        "graph_replays_prompt_checkpoint": slot.replays,
        "graph_disabled_reason": slot.disabled,
        "checks": checks,
        "all_ok": all(c["ok"] for c in checks),
    }


def _scale(s: float):
    from djinn_nb.engine import Edit

    return Edit(scale=s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["random:gpt2", "random:llama-7b"])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--out", default="experiments/out/gpu_exactness")
    args = p.parse_args(argv)
    results = []
    for m in args.models:
        res = check_model(m, "bfloat16" if "7b" in m else "float32", args.seq, args.new_tokens)
        results.append(res)
        for c in res["checks"]:
            print(f"{m:18s} {'OK ' if c['ok'] else 'FAIL'} {c['check']}  {c.get('continued_by') or ''}")
        print(f"{m}: graph replays {res['graph_replays_prompt_checkpoint']}, disabled: {res['graph_disabled_reason']}")
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gpu_exactness.json", {"environment": environment("cuda:0"), "results": results})
    ok = all(r["all_ok"] for r in results)
    print(json.dumps({"all_ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
