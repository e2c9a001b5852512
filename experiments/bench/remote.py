"""What each notebook action costs over a real network's latency (issue 21).

    python -m experiments.bench.remote --rtt 0 5 25 --out DIR

The embedded SmolLM2 behind a server in this process, reached on loopback and through
``experiments/harness/latency_proxy.py`` at each ``--rtt`` (milliseconds, both channels). Per action: the
rpyc requests it sends (counted at the protocol level), its fastest wall time of ``--rounds``
interleaved with the same action on loopback, and that time less the loopback one in round trips
(the goal: at most 3, i.e. wall ≤ compute + 3 × RTT). Floor: one round trip per action.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import djinn_nb
from djinn_nb.serving.embedded import start_embedded_server

from ..exp3_whitebox.exp3lib.cli import add_model_args
from ..exp3_whitebox.exp3lib.env import environment, write_json
from ..harness.latency_proxy import DelayedServer
from ..harness.round_trips import count_requests  # the counter tests/test_round_trips.py uses

PROMPT = "The Eiffel Tower is located in the city of"


def actions(client: Any, text: bool = True) -> dict[str, Callable[[], Any]]:
    """The actions; ``text=False`` (a random model: no tokenizer) gives token ids for its prompts."""
    layers = client.info["num_layers"]
    mid = min(10, layers - 2)
    prompt: Any = PROMPT if text else [(37 * i + 11) % 500 + 10 for i in range(11)]
    clean: Any = "The Eiffel Tower is in" if text else prompt[:6]
    corrupted: Any = "The Colosseum is in" if text else [prompt[0] + 1, *prompt[1:6]]
    paused = client.generate(prompt, max_new_tokens=4, breakpoints=[(mid, 1)])
    return {
        "generate_to_a_pause": lambda: client.generate(prompt, max_new_tokens=4, breakpoints=[(mid, 1)]).close(),
        "fork_text": (lambda: paused.fork(scale=0.9, breakpoints=[], close=True).text) if text else
                     (lambda: paused.fork(scale=0.9, breakpoints=[], close=True).token_ids),  # no tokenizer: ids
        "lens_k5": lambda: paused.lens(k=5),
        "runs": lambda: client.runs(),
        "causal_trace_3_layers": lambda: djinn_nb.causal_trace(client, clean, corrupted, answer=None if text else 7,
                                                               layers=[0, mid, layers - 1], progress=False),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rtt", type=float, nargs="+", default=[0.0, 5.0, 25.0])
    p.add_argument("--rounds", type=int, default=7)
    add_model_args(p, model=None, device="cpu", model_help="djinn-server's --model (default: the embedded SmolLM2)")
    p.add_argument("--out", default="experiments/out/remote")
    args = p.parse_args(argv)
    server = start_embedded_server(args.model, args.device, args.dtype)
    text = server.state.engine.tokenizer is not None
    near = djinn_nb.connect(server.address)
    local = actions(near, text)
    results: dict[str, Any] = {}
    for rtt in args.rtt:
        with DelayedServer(server.address, server.state.bulk.port, rtt_ms=rtt) as address:
            far = djinn_nb.connect(address)
            remote = actions(far, text)
            for name in local:
                local[name](), remote[name]()  # warm
                with count_requests(far) as sent:
                    remote[name]()
                near_t, far_t = [], []
                for _ in range(args.rounds):
                    for action, times in ((local[name], near_t), (remote[name], far_t)):
                        t0 = time.perf_counter()
                        action()
                        times.append(time.perf_counter() - t0)
                base, linked = min(near_t), min(far_t)
                results.setdefault(name, {})[f"rtt_{rtt:g}ms"] = {
                    "requests": sent.n, "loopback_ms": base * 1e3, "linked_ms": linked * 1e3,
                    "over_in_round_trips": (linked - base) / (rtt / 1e3) if rtt else None,
                }
            far.close()
    near.close()
    server.close()
    out = {"benchmark": "notebook actions over an injected round-trip delay (both channels)",
           "model": args.model or "embedded SmolLM2-135M", "rounds": args.rounds, "goal": "linked <= loopback + 3 x RTT",
           "environment": environment(server.state.engine.device, server.state.engine.dtype), "actions": results}
    write_json(Path(args.out) / "remote.json", out)
    for name, by_rtt in results.items():
        print(name, "; ".join(f"{k}: {v['requests']} req, {v['linked_ms']:.1f} ms"
                              + (f" (+{v['over_in_round_trips']:.2f} RTT)" if v["over_in_round_trips"] is not None else "")
                              for k, v in by_rtt.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
