"""Would a pause that does not unwind be cheaper? (issue 14, item 1: "continue inside the step without unwinding")

    python -m experiments.probes.cpu_pause_greenlet [--rounds 40] [--out DIR]

A pause can leave a forward without unwinding it: run the forward in a greenlet and, in the
stop hook, switch to the caller; resuming switches back and the model's own forward goes on.
This compares, on a tiny random GPT-2 (12 blocks, width 64, one torch thread: host cost only),
the time of a decoding step, three ways, in one process, alternating round by round:

- ``plain``: the model's own forward;
- ``unwind``: the forward stopped at block 6 by an exception from a hook, then blocks 7-11,
  the final norm and the head run by hand with the block's captured arguments (what the
  engine's armed step does, without the engine's bookkeeping around it);
- ``greenlet``: the forward run in a greenlet, suspended at block 6 by a switch to the caller
  and resumed at once (no unwinding, no hand-run blocks).

Each round is a 48-token greedy generation per way; reported: the median over rounds of each
way's median step time, and of ``way - plain`` per round. Tokens must be the same in all three.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ..exp3_whitebox.exp3lib.env import environment, write_json

LAYER = 6


class _Stop(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    import greenlet
    from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=12, n_embd=64, n_head=4, vocab_size=1000, n_positions=512, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    seen: dict = {"mode": "plain"}

    def pre_hook(_m, args, kwargs):
        if seen["mode"] == "unwind":
            seen["args"], seen["kwargs"] = args[1:], kwargs

    def post_hook(_m, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        if seen["mode"] == "unwind":
            seen["h"] = h
            raise _Stop
        if seen["mode"] == "greenlet":
            greenlet.getcurrent().parent.switch(h)  # paused here until the caller switches back
        return None

    block = model.transformer.h[LAYER]
    block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    block.register_forward_hook(post_hook)

    def whole(x, cache):
        return model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def step(x, cache, mode):
        seen["mode"] = mode
        if mode == "plain":
            return whole(x, cache)
        if mode == "unwind":
            try:
                model.transformer(input_ids=x, past_key_values=cache, use_cache=True)
            except _Stop:
                pass
            h, a, kw = seen["h"], seen["args"], seen["kwargs"]
            for b in model.transformer.h[LAYER + 1:]:
                h = b(h, *a, **kw)
                h = h if type(h) is torch.Tensor else h[0]
            return model.lm_head(model.transformer.ln_f(h[:, -1:]))[:, -1]
        g = greenlet.greenlet(lambda: whole(x, cache))
        h = g.switch()  # the pause: the block's output, the forward suspended
        return g.switch()  # resume: the model's own forward runs to its logits

    ways = ("plain", "unwind", "greenlet")
    per_round: dict[str, list[float]] = {w: [] for w in ways}
    tokens: dict[str, list[int]] = {}
    prompt = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for r in range(args.rounds):
            for mode in (ways if r % 2 else ways[::-1]):
                cache = DynamicCache(config=cfg)
                seen["mode"] = "plain"
                logits = whole(prompt, cache)
                times, toks = [], []
                for _ in range(args.steps):
                    x = logits.argmax(-1, keepdim=True)
                    toks.append(int(x))
                    t = time.perf_counter()
                    logits = step(x, cache, mode)
                    int(logits.argmax())
                    times.append(time.perf_counter() - t)
                per_round[mode].append(statistics.median(times) * 1e6)
                tokens[mode] = toks
    out = {
        "what": "a decoding step's host time: the model's own forward, a pause that unwinds (exception + blocks "
                "by hand), a pause that does not (greenlet switch out and back); tiny GPT-2, 12 blocks, 1 thread",
        "rounds": args.rounds, "steps": args.steps, "same_tokens": len({tuple(t) for t in tokens.values()}) == 1,
        "us_per_step_median": {w: statistics.median(v) for w, v in per_round.items()},
        "us_over_plain_median": {w: statistics.median(a - b for a, b in zip(per_round[w], per_round["plain"]))
                                 for w in ways[1:]},
        "greenlet": greenlet.__version__,
        "environment": environment("cpu", "float32"),
    }
    print(f"same tokens: {out['same_tokens']}")
    for w in ways:
        extra = f"  ({out['us_over_plain_median'][w]:+.1f} us over plain)" if w != "plain" else ""
        print(f"  {w:9s} {out['us_per_step_median'][w]:8.1f} us/step{extra}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "cpu_pause_greenlet.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
