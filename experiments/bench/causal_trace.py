"""``causal_trace`` against the baseline a careful researcher writes (issue 23), in one run.

    python -m experiments.bench.causal_trace --model random:gpt2 --device cpu --positions 16 --out DIR

Three ways to the same grid (every layer x ``--positions`` positions of a prompt pair that
differs at three positions), timed round by round in one process beside one ``djinn-server``:
``djinn_nb.causal_trace`` through the client (one server call); plain PyTorch forward hooks on
this process's copy of the same random model, one *batched* forward per layer (every
position's patch a row of the batch, inference mode); and, unless ``--no-per-cell``, one full
forward per cell (and nnsight where importable). The grids' largest difference is recorded.
On a CPU set ``DJINN_THREADS``/``OMP_NUM_THREADS`` for the thread count (recorded).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import djinn_nb
from djinn_nb.core.models import load_model

from .patching import trace_section
from ..exp3_whitebox.exp3lib.cli import add_model_args
from ..exp3_whitebox.exp3lib.env import environment, model_dtype, write_json
from ..harness.server_process import djinn_server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--positions", type=int, default=16)
    p.add_argument("--trace-repeats", type=int, default=3)
    p.add_argument("--no-per-cell", action="store_true", help="leave out the per-cell hook loop and nnsight")
    p.add_argument("--out", default="experiments/out/causal_trace")
    args = p.parse_args(argv)
    with djinn_server(args.model, args.device, args.dtype) as address:
        client = djinn_nb.connect(address)
        model = load_model(args.model, device=args.device, dtype=args.dtype).model
        out = {"benchmark": "causal_trace through the client vs a batched hook loop (one forward per layer)",
               "model": args.model, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
               "environment": environment(args.device, model_dtype(args.dtype, args.device, args.model)),
               **trace_section(args, client, model, client.info["vocab_size"], client.info["num_layers"])}
        client.close()
    name = f"causal_trace_{args.model.replace(':', '_')}_p{args.positions}_{out['environment'].get('dtype', 'x')}.json"
    write_json(Path(args.out) / name, out)
    t = out["trace"]
    print(f"trace {t['layers']}x{t['positions']}: " + ", ".join(f"{k} {v['median_ms']:.0f} ms" for k, v in t["ms"].items())
          + f"; batched hooks / djinn {out['batched_hooks_over_djinn']:.2f}x; max |diff| {t['max_abs_diff_vs_hooks']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
