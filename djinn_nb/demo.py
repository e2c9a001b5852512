"""``make demo``: a paused run on the default model, inspected, steered and resumed.

Everything goes through the public client API, over the same rpyc protocol a
remote ``djinn-server`` speaks. ``python -m djinn_nb.demo --help`` for options.
"""
from __future__ import annotations

import argparse
import time

from .client import connect
from .notebook.compare import tokens_changed
from .serving import localhome


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default=None, help="host:port of a djinn-server (default: your local server)")
    p.add_argument("--model", default=None, help="model for the local server (default: SmolLM2)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--layer", type=int, default=None, help="breakpoint layer (default: a third of the depth)")
    p.add_argument("--max-new-tokens", type=int, default=12)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    client = connect(args.address) if args.address else connect(model=args.model)
    info = client.info
    print(f"Connected to {info['model']}: {info['num_layers']} decoder blocks, hidden size "
          f"{info['hidden_size']}, {info['dtype']} on {info['device']} ({time.perf_counter() - t0:.1f} s).")
    # a third of the depth: on the default model, x0.9 there changes the text (layer 10 of 30:
    # 7 of 12 tokens, measured on CPU); at the middle layer it changes nothing
    layer = args.layer if args.layer is not None else info["num_layers"] // 3

    plain = client.generate(args.prompt, max_new_tokens=args.max_new_tokens)
    print(f"\nUnpaused run:   {args.prompt!r} -> {plain.text!r}")

    run = client.generate(args.prompt, max_new_tokens=args.max_new_tokens, breakpoints=[layer])
    print(f"\nA run with a breakpoint after block {layer} paused at layer {run.layer}, step {run.step} "
          f"(the prompt pass); the server holds {run.bytes_held / 1e6:.2f} MB for it (KV cache + checkpoint).")
    h = run.activation()
    stats = run.activation_stats
    assert stats is not None, "a paused run has its activation's statistics"
    print(f"Its hidden state came over as a {tuple(h.shape)} {h.dtype} tensor: norm {stats['norm']:.1f}, "
          f"mean {stats['mean']:+.4f}, max {stats['max']:.2f}.")
    tokens = client.tokenize(args.prompt)
    print("Norm per position: " + ", ".join(
        f"{client.decode([t])!r}={n:.1f}" for t, n in zip(tokens, stats["position_norm"])))

    print("\nSteering: forks from the same checkpoint, each scaling the hidden state (layers before it are not rerun):")
    for factor in (0.9, 0.5, 1.5):
        fork = run.fork(scale=factor)
        ms = fork.timings_ms.get("execute", float("nan"))
        changed, aligned = tokens_changed(plain.token_ids, fork.token_ids)
        print(f"  x{factor:<4} -> {fork.text!r}  ({changed} of {aligned} tokens changed, aligned as the slider "
              f"does; server time {ms:.1f} ms)")
        fork.close()

    run.resume()
    same = run.token_ids == plain.token_ids
    print(f"\nThe original run, still paused after the forks, resumed unmodified: {run.text!r}")
    print(f"Identical to the unpaused run: {same}.")
    run.close()
    plain.close()
    client.close()
    print(f"\nDone in {time.perf_counter() - t0:.1f} s.")
    if not args.address:
        print("Your local djinn-server keeps the model loaded for the next connect() and exits after "
              f"{localhome.idle_seconds() / 60:g} idle minutes (`djinn-server status`, `djinn-server stop`).")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
