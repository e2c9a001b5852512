"""Pausing at every step through the client (issue 14, goal: <= 5 % of a step).

    python -m experiments.bench.client_pause --model random:gpt2 --device cuda:0 [--out DIR]

A ``djinn-server`` in another process; the client generates ``--new-tokens`` tokens from a
``--seq``-token prompt two ways, interleaved round by round: plain (``generate``, no breakpoint:
one call) and paused at the middle layer at every step, each pause resumed by the client with
``run.resume()`` (one round trip per step). Per round: the extra time per step,
``(paused - plain) / steps``, and its share of a plain step, ``plain / steps``. Reported: the
median and 25th-75th percentiles over rounds; the tokens of both must be equal. And, least
exposed to drift, adjacent steps: one run paused on even steps only, each paused step's duration
(from the server's token times, ``run.history()``) over the unpaused steps' beside it.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import djinn_nb

from ..exp3_whitebox.exp3lib.cli import add_generation_args
from ..exp3_whitebox.exp3lib.env import environment, model_dtype, write_json
from ..harness.server_process import djinn_server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_args(p)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--spin-us", type=int, default=None, help="the client's spin_us (default: connect()'s default)")
    p.add_argument("--out", default="experiments/out/client_pause")
    args = p.parse_args(argv)
    with djinn_server(args.model, args.device, args.dtype) as address:
        client = djinn_nb.connect(address, spin_us=args.spin_us)
        spin_s = client._conn._channel.stream.spin_s
        layer = client.info["num_layers"] // 2
        prompt = torch.randint(0, client.info["vocab_size"], (args.seq,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        steps = args.new_tokens

        def plain() -> list[int]:
            run = client.generate(prompt, max_new_tokens=steps)
            tokens = run.token_ids
            run.close()
            return tokens

        def paused() -> list[int]:
            run = client.generate(prompt, max_new_tokens=steps, breakpoints=[(layer, "all")])
            pauses = 0
            while run.paused:
                run.resume()
                pauses += 1
            if pauses != steps:
                raise RuntimeError(f"expected {steps} pauses, got {pauses}")
            tokens = run.token_ids
            run.close()
            return tokens

        def alternate() -> float:
            """One run paused on even steps only, resumed by the client: its paused steps' median
            duration over its unpaused steps' (adjacent steps of one generation, from the server's
            own token times), the least exposed to drift."""
            bps = [(layer, s) for s in range(2, steps, 2)]
            run = client.generate(prompt, max_new_tokens=steps, breakpoints=bps)
            while run.paused:
                run.resume()
            times = [h["time_s"] for h in run.history()]
            run.close()
            gaps = {k: times[k] - times[k - 1] for k in range(2, steps)}
            paused_steps = [g for k, g in gaps.items() if k % 2 == 0]
            plain_steps = [g for k, g in gaps.items() if k % 2 == 1]
            return statistics.median(paused_steps) / statistics.median(plain_steps) - 1

        for _ in range(2):  # warm-up (graphs, allocator)
            plain(), paused(), alternate()
        alternates = []
        shares, extras, plain_ms, paused_ms = [], [], [], []
        same = True
        for r in range(args.rounds):
            t = {}
            out = {}
            for name, fn in (("plain", plain), ("paused", paused)) if r % 2 == 0 else (("paused", paused), ("plain", plain)):
                t0 = time.perf_counter()
                out[name] = fn()
                t[name] = (time.perf_counter() - t0) * 1e3
            same &= out["plain"] == out["paused"]
            alternates.append(alternate())
            extra = (t["paused"] - t["plain"]) / steps
            extras.append(extra)
            shares.append(extra / (t["plain"] / steps))
            plain_ms.append(t["plain"])
            paused_ms.append(t["paused"])
            print(f"round {r + 1}/{args.rounds}: plain {t['plain']:.1f} ms, paused every step {t['paused']:.1f} ms, "
                  f"+{extra * 1e3:.0f} us/step ({100 * shares[-1]:+.1f} %)", flush=True)
        client.close()
    q = statistics.quantiles(shares, n=4)
    qa = statistics.quantiles(alternates, n=4)
    result = {
        "benchmark": "a pause at every step, resumed through the client, vs plain generate through the client",
        "model": args.model, "dtype": args.dtype, "layer": layer, "seq_len": args.seq, "new_tokens": steps,
        "rounds": args.rounds, "environment": environment(args.device, model_dtype(args.dtype, args.device, args.model)), "tokens_equal": same,
        "client_spin_s": spin_s,
        "plain_ms_median": statistics.median(plain_ms), "paused_ms_median": statistics.median(paused_ms),
        "extra_us_per_step_median": statistics.median(extras) * 1e3,
        "extra_share_of_step_median": statistics.median(shares), "extra_share_p25": q[0], "extra_share_p75": q[2],
        "goal_share": 0.05,
        "alternate_steps": {"paused_over_plain_step_minus_1_median": statistics.median(alternates),
                            "p25": qa[0], "p75": qa[2], "per_round": alternates,
                            "what": "one run paused on even steps only, resumed by the client; its paused steps' "
                                    "median duration over its unpaused steps', from the server's token times"},
    }
    name = f"bench_client_pause_{args.model.replace(':', '_')}_spin{round(spin_s * 1e6)}us.json"
    write_json(Path(args.out) / name, result)
    print(f"{args.model}: pausing at every step through the client costs {result['extra_us_per_step_median']:.0f} us "
          f"per step, {100 * result['extra_share_of_step_median']:.1f} % of a plain step "
          f"(p25..p75 {100 * q[0]:.1f}..{100 * q[2]:.1f} %; goal <= 5 %); tokens equal: {same}; adjacent steps: "
          f"{100 * statistics.median(alternates):+.1f} % (p25..p75 {100 * qa[0]:.1f}..{100 * qa[2]:.1f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
