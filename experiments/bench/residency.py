"""Residency benchmark (issue 3): offload/restore of paused runs, and what paused runs cost others.

    python -m experiments.bench.residency --model random:gpt2 --device cuda:0 --out DIR

1. Restore of an offloaded paused run vs a raw pinned host-to-device copy of the
   same number of bytes (goal <= 1.2x), at several prompt lengths.
2. Run B's latency (a whole generation, no breakpoints) on an idle server vs with
   32 paused runs resident on the device vs with those 32 offloaded (goal <= 1.1x).
Timed in one process with the engine, interleaved, GPU synchronized around every
sample; medians. Only the engine's public calls: "restore" is ``reset_edit`` on an
offloaded run with no edits (brings it back, changes nothing), and the idle server
is a second engine over the same model that holds no runs.
Prediction (written before the first GPU run): restore is one H2D copy plus ~3 view ops per tensor, so ~1.1x for GPT-2 seq 128 (9 MB) and ~1.0x
for larger states; paused runs do no work, so run B's ratio is ~1.0 either way.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from djinn_nb.core.engine import Engine
from djinn_nb.core.models import load_model

from ..exp3_whitebox.exp3lib.cli import add_model_args
from ..exp3_whitebox.exp3lib.env import environment, model_dtype, write_json
from ..exp3_whitebox.exp3lib.timing import Case, measure_interleaved, ratio, sync


def restore_vs_raw(engine: Engine, seq: int, layer: int, repeats: int) -> dict:
    prompt = torch.randint(0, engine.info()["vocab_size"], (seq,), generator=torch.Generator().manual_seed(seq)).tolist()
    run = engine.generate(prompt, 4, breakpoints=[layer])
    engine.offload(run.id)
    nbytes = run.host_pack.nbytes
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=engine.device.type == "cuda")

    def offloaded() -> None:
        engine.offload(run.id)

    res = measure_interleaved(
        {
            "restore": Case(lambda _: engine.reset_edit(run.id), setup=offloaded),
            "raw_pinned_copy": Case(lambda _: host.to(engine.device, non_blocking=True)),
        },
        warmup=5,
        repeats=repeats,
    )
    engine.resume(run.id)
    exact_tokens = list(run.token_ids)
    plain = engine.generate(prompt, 4)
    out = {
        "seq_len": seq,
        "layer": layer,
        "state_bytes": nbytes,
        "restore_ms": res["restore"][0].as_dict(),
        "raw_pinned_copy_ms": res["raw_pinned_copy"][0].as_dict(),
        "restore_over_raw": ratio(res["restore"][0].median_ms, res["raw_pinned_copy"][0].median_ms),
        "tokens_after_restore_equal_unpaused": exact_tokens == plain.token_ids,
    }
    engine.close(run.id)
    engine.close(plain.id)
    return out


def run_b_latency(engine: Engine, idle: Engine, paused: int, seq: int, layer: int, new_tokens: int, repeats: int) -> dict:
    """Run B on ``engine`` with ``paused`` runs resident or offloaded, and on ``idle`` (the same
    model, no runs; the paused runs offloaded, so the device holds nothing of theirs)."""
    gen = torch.Generator().manual_seed(0)
    vocab = engine.info()["vocab_size"]
    prompt_b = torch.randint(0, vocab, (seq,), generator=gen).tolist()
    others = [engine.generate(torch.randint(0, vocab, (seq,), generator=gen).tolist(), 8, [layer]) for _ in range(paused)]
    held = sum(r.bytes_held() for r in others)

    def run_b_on(eng: Engine):
        def run_b(_: object) -> list[int]:
            r = eng.generate(prompt_b, new_tokens)
            eng.close(r.id)
            return r.token_ids
        return run_b

    def set_offloaded(flag: bool):
        def setup() -> None:
            for r in others:
                if flag and not r.offloaded:
                    engine.offload(r.id)
                elif not flag and r.offloaded:
                    engine.reset_edit(r.id)  # restores it (no edits to reset)
            sync()
        return setup

    res = measure_interleaved(
        {
            "idle": Case(run_b_on(idle), setup=set_offloaded(True)),
            "paused_resident": Case(run_b_on(engine), setup=set_offloaded(False)),
            "paused_offloaded": Case(run_b_on(engine), setup=set_offloaded(True)),
        },
        warmup=3,
        repeats=repeats,
    )
    tokens = {k: v[1][-1] for k, v in res.items()}
    for r in others:
        engine.close(r.id)
    idle_ms = res["idle"][0].median_ms
    return {
        "paused_runs": paused,
        "paused_bytes": held,
        "run_b_new_tokens": new_tokens,
        "run_b_ms": {k: v[0].as_dict() for k, v in res.items()},
        "resident_over_idle": ratio(res["paused_resident"][0].median_ms, idle_ms),
        "offloaded_over_idle": ratio(res["paused_offloaded"][0].median_ms, idle_ms),
        "run_b_tokens_identical": len({tuple(t) for t in tokens.values()}) == 1,
        "device_memory_allocated": torch.cuda.memory_allocated(engine.device) if engine.device.type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 1000])
    p.add_argument("--paused", type=int, default=32)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default="experiments/out/residency")
    args = p.parse_args(argv)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.name)
    layer = engine.num_layers // 2
    result = {
        "benchmark": "residency",
        "model": args.model,
        "environment": environment(args.device, model_dtype(args.dtype, args.device, args.model)),
        "restore": [restore_vs_raw(engine, s, layer, args.repeats) for s in args.seq_lens],
        "run_b": run_b_latency(engine, Engine(loaded.model, loaded.tokenizer, loaded.name), args.paused, 128, layer, 16,
                               max(5, args.repeats // 3)),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"residency_{args.model.replace(':', '_').replace('/', '_')}.json"
    write_json(out / name, result)
    for r in result["restore"]:
        print(f"restore seq {r['seq_len']:5d}: {r['state_bytes'] / 1e6:8.2f} MB  restore {r['restore_ms']['median_ms']:.3f} ms"
              f"  raw pinned copy {r['raw_pinned_copy_ms']['median_ms']:.3f} ms  ratio {r['restore_over_raw']:.2f}"
              f"  exact {r['tokens_after_restore_equal_unpaused']}")
    b = result["run_b"]
    print(f"run B ({b['run_b_new_tokens']} tokens) idle {b['run_b_ms']['idle']['median_ms']:.2f} ms; with {b['paused_runs']} paused"
          f" ({b['paused_bytes'] / 1e6:.1f} MB): resident x{b['resident_over_idle']:.3f}, offloaded x{b['offloaded_over_idle']:.3f}")
    print(json.dumps({"written": str(out / name)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
