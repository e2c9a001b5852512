"""Fork latency through the client to a separate ``djinn-server`` process (issue 2's goal).

    python -m experiments.bench.fork --model random:gpt2 --device cuda:0 --layer 6 --seq 128 --out DIR

A run paused at (layer, step 0) with max_new_tokens=1 is forked to its end again
and again, end to end through the client on loopback (the fork's first two runs
are eager; later ones replay a CUDA graph, see djinn_nb/graphs.py). Beside it, in
this process on its own copy of the same random model, the remaining layers alone:
blocks layer+1.. + final norm + head from the captured block input, in plain eager
PyTorch. The two are interleaved, one sample of each per round; medians.
Goal: fork / remaining-layers <= 1.15, and below the study's 2.2 ms for GPT-2 at layer 6.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import djinn_nb
from djinn_nb.core.architecture import find_anatomy
from djinn_nb.core.models import load_model

from ..exp3_whitebox.exp3lib import eager
from ..exp3_whitebox.exp3lib.cli import add_generation_args
from ..exp3_whitebox.exp3lib.env import environment, model_dtype, write_json
from ..exp3_whitebox.exp3lib.timing import Case, measure_interleaved, ratio
from ..harness.server_process import djinn_server

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_args(p, new_tokens=None)  # a fork runs to one token
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--out", default="experiments/out/fork")
    args = p.parse_args(argv)
    with djinn_server(args.model, args.device, args.dtype) as address:
        client = djinn_nb.connect(address)
        model = load_model(args.model, device=args.device, dtype=args.dtype).model
        anatomy = find_anatomy(model)
        prompt = torch.randint(0, client.info["vocab_size"], (args.seq,), generator=torch.Generator().manual_seed(0)).tolist()
        cap = eager.capture(model, anatomy, prompt, args.layer)
        tail_setup, tail_run = eager.tail_runner(anatomy, cap)
        parent = client.generate(prompt, max_new_tokens=1, breakpoints=[args.layer])
        warm = [parent.fork(breakpoints=[]) for _ in range(3)]
        paths = [f.summary["continued_by"] for f in warm]
        same = len({tuple(f.token_ids) for f in warm}) == 1
        for f in warm:
            f.close()
        res = measure_interleaved(
            {
                "remaining_layers_alone": Case(tail_run, tail_setup),
                "fork_client_subprocess_server": Case(lambda _: parent.fork(breakpoints=[]), teardown=lambda f: f.close()),
            },
            warmup=10,
            repeats=args.repeats,
        )
        tail = res["remaining_layers_alone"][0]
        fork = res["fork_client_subprocess_server"][0]
        forks = res["fork_client_subprocess_server"][1]
        server_ms = statistics.median(f.timings_ms.get("fork_copy", 0) + f.timings_ms.get("execute", 0) for f in forks)
        out = {
            "benchmark": "fork through the client to a djinn-server subprocess",
            "model": args.model, "layer": args.layer, "seq_len": args.seq,
            "environment": environment(args.device, model_dtype(args.dtype, args.device, args.model)),
            "first_forks_continued_by": paths,
            "forks_agree": same,
            "remaining_layers_alone_ms": tail.as_dict(),
            "fork_client_ms": fork.as_dict(),
            "fork_server_side_ms_median": server_ms,
            "transport_ms_median": fork.median_ms - server_ms,
            "fork_over_remaining_layers": ratio(fork.median_ms, tail.median_ms),
        }
        parent.close()
        client.close()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = f"bench_fork_{args.model.replace(':', '_')}_L{args.layer}_s{args.seq}.json"
    write_json(Path(args.out) / name, out)
    print(f"{args.model} layer {args.layer} seq {args.seq}: fork through client {fork.median_ms:.3f} ms "
          f"(server {server_ms:.3f}, transport {out['transport_ms_median']:.3f}) vs remaining layers alone "
          f"{tail.median_ms:.3f} ms -> {out['fork_over_remaining_layers']:.2f}x; first forks {paths}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
