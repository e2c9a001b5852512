"""What is bit-exact in a batch, per dtype: ``fork_many`` continuations against the same forks run one
by one, and HF's own batched ``generate`` against single-row generation, beside it.

    python -m experiments.bench.continuations --model random:gpt2 --device cuda:0 --out DIR

For each dtype (float32, bfloat16): a run paused at (layer, step 0) of a random ``--seq``-token
prompt; 16 forks with scales 1.00, 1.01, … (so each row differs) run ``--new-tokens`` tokens, once as
one ``fork_many`` batch and once one by one. Counted: rows whose first token differs, rows whose
whole continuation differs. Beside it, plain HF: 16 identical copies of the prompt generated as
one batch against the single-row generation (how many rows differ, how many distinct
continuations the 16 give). The prediction: identical in fp32 (rounding differences far below the
gap between the top two logits), first tokens identical in bf16, later tokens diverging in some rows
once a near-tie flips, as in HF's own batched generation.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

import djinn_nb
from djinn_nb.core.models import load_model

from ..exp3_whitebox.exp3lib.env import environment, model_dtype, write_json


def _forks(client: Any, prompt: list[int], layer: int, n: int, rows: int) -> dict[str, Any]:
    parent = client.generate(prompt, max_new_tokens=n, breakpoints=[layer])
    specs = [{"scale": 1.0 + 0.01 * i, "breakpoints": []} for i in range(rows)]
    batched = parent.fork_many(specs)
    singles = [parent.fork(**s) for s in specs]
    first = sum(b.token_ids[0] != s.token_ids[0] for b, s in zip(batched, singles))
    whole = sum(b.token_ids != s.token_ids for b, s in zip(batched, singles))
    for r in (*batched, *singles, parent):
        r.close()
    return {"rows": rows, "first_token_differs": first, "continuation_differs": whole}


def _hf(model: Any, prompt: list[int], n: int, rows: int, device: str) -> dict[str, Any]:
    x = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        one = model.generate(x, max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        many = model.generate(x.repeat(rows, 1), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)[:, len(prompt):].tolist()
    return {"rows": rows, "differs_from_single_row": sum(r != one for r in many),
            "distinct_continuations": len({tuple(r) for r in many})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--out", default="experiments/out/continuations")
    args = p.parse_args(argv)
    results = []
    for dtype in args.dtypes.split(","):
        loaded = load_model(args.model, device=args.device, dtype=dtype)
        vocab = int(loaded.model.config.vocab_size)
        prompt = torch.randint(0, vocab, (args.seq,), generator=torch.Generator().manual_seed(0)).tolist()
        client = djinn_nb.connect(model=args.model, device=args.device, dtype=dtype)
        row = {"dtype": model_dtype(dtype, args.device, args.model),
               "fork_many_vs_single_forks": _forks(client, prompt, args.layer, args.new_tokens, args.rows),
               "hf_batched_generate_vs_single_row": _hf(loaded.model, prompt, args.new_tokens, args.rows, args.device)}
        results.append(row)
        print(row, flush=True)
        del loaded
    name = f"continuations_{args.model.replace(':', '_')}.json"
    write_json(Path(args.out) / name, {
        "what": f"{args.rows} continuations of {args.new_tokens} tokens: fork_many vs single forks, and HF's "
                "batched generate vs single-row generation, per dtype",
        "model": args.model, "layer": args.layer, "seq_len": args.seq, "new_tokens": args.new_tokens,
        "environment": environment(args.device, args.dtypes), "results": results})
    print(f"wrote {Path(args.out) / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
