"""A Llama-70B-shape model split over several GPUs of one host (issue 14, item 4), in-process.

    python -m experiments.bench.multi_gpu --gpus 4 --out $OUT                 # 70B shape, bf16, ~140 GB
    python -m experiments.bench.multi_gpu --shape 7b --gpus 2 --out $OUT      # the fallback
    python -m experiments.bench.multi_gpu --shape tiny --out /tmp/b70         # the script's logic, on CPU

No hub and no server (no rpyc needed): random weights, built without a host copy —
the model is made under accelerate's ``init_empty_weights``, a device map comes from
accelerate (``get_balanced_memory`` + ``infer_auto_device_map``: what
``device_map="auto"`` does over several GPUs, with ``--max-memory-gib`` per GPU), each
parameter is created empty on its GPU and filled in place (normal(0, 0.02), norms 1),
then ``dispatch_model`` adds the hooks that move activations between GPUs. The
``djinn_nb.core.engine.Engine`` (its load-time exactness probe included) then runs:

1. ``plain``: an unpaused greedy generation (the reference tokens) and tokens/s.
2. ``pause_resume``: for a layer in the middle of each GPU's share, a run paused at
   that layer at the prompt pass and at every decoding step, resumed each time;
   its tokens against the unpaused run's (100 % required).
3. ``fork``: a run paused at the middle layer (prompt pass), forked to its first token
   again and again, against the remaining layers alone (blocks layer+1.. + norm + head
   from the captured block input, plain PyTorch), interleaved; medians.
4. ``offload``: a paused run offloaded to host memory and resumed (restored), timed,
   its tokens against the unpaused run's.

Each part is time-boxed (``--part-seconds``) and prints its progress; the JSON
(``bench_70b_<shape>_<n>gpu.json``, card, versions, commit, device map) is written
after each part, so a run cut short still leaves what it measured.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "70b": dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False),
    "7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
               tie_word_embeddings=False),
    "tiny": dict(num_hidden_layers=8, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, initializer_range=0.2,
                 tie_word_embeddings=False),
}
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


class Part:
    """``with Part(result, name):`` — an exception ends this part only: it is recorded and printed,
    and the parts after it still run (one GPU call should bring back all it can)."""

    def __init__(self, result: dict, name: str):
        self.result, self.name = result, name

    def __enter__(self) -> "Part":
        say(f"--- {self.name}")
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        import traceback

        self.result.setdefault("errors", {})[self.name] = "".join(traceback.format_exception(kind, exc, tb))[-3000:]
        say(f"{self.name} FAILED: {type(exc).__name__}: {exc}")
        return True


def sync() -> None:
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def build(shape: str, gpus: int, dtype: torch.dtype, max_memory_gib: float | None, seed: int) -> tuple[Any, dict]:
    """The random model, its weights created on the devices the map gives them; and facts about it."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import AutoModelForCausalLM, LlamaConfig

    overrides = dict(SHAPES[shape])
    # no end-of-sequence id: a random model must generate every token asked for (and tiny
    # vocabularies would not hold the full-size special ids anyway)
    overrides.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config = LlamaConfig(**overrides)
    std = float(getattr(config, "initializer_range", 0.02))
    t = time.perf_counter()
    with init_empty_weights():  # parameters on "meta"; buffers (rotary inv_freq) real, on the host
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    no_split = [type(model.model.layers[0]).__name__]
    if gpus > 0:
        total = {i: torch.cuda.get_device_properties(i).total_memory for i in range(gpus)}
        cap = {i: int(max_memory_gib * 2**30) if max_memory_gib else int(total[i] * 0.9) for i in range(gpus)}
        balanced = get_balanced_memory(model, max_memory=cap, no_split_module_classes=no_split, dtype=dtype)
        device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)
        bad = sorted({str(d) for d in device_map.values() if not isinstance(d, int)})
        if bad:
            raise RuntimeError(f"the model does not fit on {gpus} GPUs under {cap}: the map sends parts to {bad}")
    else:
        device_map = {"": "cpu"}
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def device_of(name: str) -> Any:
        best = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
        return device_map[best]

    for name, param in list(model.named_parameters()):
        dev = device_of(name)
        dev = f"cuda:{dev}" if isinstance(dev, int) else dev
        value = torch.empty(param.shape, dtype=dtype, device=dev)
        if name.endswith("norm.weight"):
            value.fill_(1.0)
        else:  # a seeded generator per tensor on its device: the same weights on any split
            g = torch.Generator(device=dev).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
            value.normal_(0.0, std, generator=g)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    if gpus > 0:
        model = dispatch_model(model, device_map=device_map)  # buffers to their devices, hooks between GPUs
    build_s = time.perf_counter() - t
    layers_per_device: dict[str, list[int]] = {}
    for i, block in enumerate(model.model.layers):
        dev = str(next(block.parameters()).device)
        layers_per_device.setdefault(dev, []).append(i)
    params = sum(p.numel() for p in model.parameters())
    facts = {
        "shape": shape, "config": overrides, "dtype": str(dtype).replace("torch.", ""), "parameters": params,
        "weight_bytes": params * torch.empty((), dtype=dtype).element_size(), "build_s": build_s,
        "device_map": {k: str(v) for k, v in device_map.items()},
        "layers_per_device": {d: [ls[0], ls[-1], len(ls)] for d, ls in layers_per_device.items()},
        "lm_head_device": str(model.lm_head.weight.device),
    }
    if gpus > 0:
        facts["memory_allocated_gib"] = {i: torch.cuda.memory_allocated(i) / 2**30 for i in range(gpus)}
    return model, facts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to split over (default: all; 0 = CPU)")
    p.add_argument("--dtype", default=None, help="default bfloat16 on GPUs, float32 on CPU")
    p.add_argument("--max-memory-gib", type=float, default=None, help="cap per GPU (default 90%% of each card)")
    p.add_argument("--seq", type=int, default=128, help="prompt length")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--fork-repeats", type=int, default=20)
    p.add_argument("--part-seconds", type=float, default=90.0, help="time box per part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/out/multi_gpu")
    a = p.parse_args(argv)
    gpus = (torch.cuda.device_count() if a.gpus is None else a.gpus) if torch.cuda.is_available() else 0
    if a.gpus and gpus < a.gpus:
        raise SystemExit(f"asked for {a.gpus} GPUs, this machine has {torch.cuda.device_count()}")
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if gpus else torch.float32)

    from djinn_nb.core.architecture import find_anatomy
    from djinn_nb.core.engine import Engine
    from djinn_nb.core.specs import Edit

    from ..exp3_whitebox.exp3lib import eager
    from ..exp3_whitebox.exp3lib.env import environment, model_dtype, write_json
    from ..exp3_whitebox.exp3lib.timing import Case, measure_interleaved

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_70b_{a.shape}_{gpus}gpu.json"
    result: dict[str, Any] = {"benchmark": "70B-shape model split over GPUs, in-process engine",
                              "args": vars(a), "gpus": gpus, "environment": environment("cuda:0" if gpus else "cpu", model_dtype(a.dtype, "cuda:0" if gpus else "cpu", "random")),
                              "parts_not_run": []}

    def save() -> None:
        write_json(path, result)

    say(f"building random {a.shape} ({dtype}) over {gpus or 'no'} GPUs ...")
    model, facts = build(a.shape, gpus, dtype, a.max_memory_gib, a.seed)
    result["model"] = facts
    say(f"built in {facts['build_s']:.1f} s: {facts['parameters'] / 1e9:.2f} B parameters, layers per device "
        f"{facts['layers_per_device']}, memory GiB {facts.get('memory_allocated_gib')}")
    save()
    t = time.perf_counter()
    engine = Engine(model, None, f"random:{a.shape}", cuda_graphs=False)
    result["engine"] = {"probe_and_setup_s": time.perf_counter() - t, "sites": engine.info()["sites"],
                        "inexact_sites": engine.inexact_sites}
    say(f"engine ready (exactness probe over every site) in {result['engine']['probe_and_setup_s']:.1f} s")
    save()
    vocab = int(model.config.vocab_size)
    prompt = torch.randint(0, vocab, (a.seq,), generator=torch.Generator().manual_seed(a.seed)).tolist()
    n = a.new_tokens

    # 1. plain
    engine.generate(prompt, 2)  # warm-up
    sync()
    t = time.perf_counter()
    plain = engine.generate(prompt, n)
    sync()
    total = time.perf_counter() - t
    times = plain.token_times
    decode = [b - x for x, b in zip(times, times[1:])]
    ref = plain.token_ids
    result["plain"] = {"tokens": len(ref), "total_s": total, "prompt_pass_and_first_token_s": times[0] - t,
                       "decode_step_ms_median": statistics.median(decode) * 1e3 if decode else None,
                       "decode_tokens_per_s": 1.0 / statistics.median(decode) if decode else None,
                       "tokens_per_s_overall": len(ref) / total}
    engine.close(plain.id)
    say(f"plain: {len(ref)} tokens in {total:.2f} s; decode {result['plain']['decode_tokens_per_s']:.1f} tokens/s")
    save()

    with Part(result, "pause_resume"):
        # 2. pause/resume at a layer on each device
        rows = []
        deadline = time.perf_counter() + a.part_seconds
        for dev, (first, last, _count) in facts["layers_per_device"].items():
            if time.perf_counter() > deadline:
                result["parts_not_run"].append(f"pause_resume on {dev}: time box reached")
                continue
            layer = (first + last) // 2
            t = time.perf_counter()
            run = engine.generate(prompt, n, breakpoints=[(layer, 0), (layer, "all")])
            pauses = 0
            while run.paused:
                pauses += 1
                engine.resume(run.id)
            sync()
            same = sum(x == y for x, y in zip(run.token_ids, ref))
            rows.append({"device": dev, "layer": layer, "pauses": pauses, "tokens_equal": run.token_ids == ref,
                         "token_accuracy_pct": 100.0 * same / len(ref), "seconds": time.perf_counter() - t})
            engine.close(run.id)
            say(f"pause/resume at layer {layer} ({dev}): {pauses} pauses, tokens equal: {run.token_ids == ref}")
        result["pause_resume"] = {"rows": rows, "all_equal": bool(rows) and all(r["tokens_equal"] for r in rows)}
        save()

    with Part(result, "fork"):
        # 3. fork at the middle layer vs the remaining layers alone
        mid = engine.num_layers // 2
        anatomy = find_anatomy(model)
        parent = engine.generate(prompt, 1, breakpoints=[mid])
        with torch.inference_mode():
            cap = eager.capture(model, anatomy, prompt, mid)
        tail_setup, tail_run = eager.tail_runner(anatomy, cap)
        budget_start = time.perf_counter()
        one = engine.fork(parent.id, Edit(), breakpoints=[])
        sync()
        one_s = time.perf_counter() - budget_start
        fork_first_token_equal = one.token_ids == ref[:1]
        engine.close(one.id)
        repeats = max(3, min(a.fork_repeats, int(a.part_seconds / max(2 * one_s, 1e-3))))
        res = measure_interleaved({
            "remaining_layers_alone": Case(tail_run, tail_setup),
            "fork": Case(lambda _: engine.fork(parent.id, Edit(), breakpoints=[]), teardown=lambda f: engine.close(f.id)),
        }, warmup=2, repeats=repeats)
        tail_ms, fork_ms = res["remaining_layers_alone"][0].median_ms, res["fork"][0].median_ms
        result["fork"] = {"layer": mid, "repeats": repeats, "fork_ms": res["fork"][0].as_dict(),
                          "remaining_layers_alone_ms": res["remaining_layers_alone"][0].as_dict(),
                          "fork_over_remaining_layers": fork_ms / tail_ms, "first_token_equal": fork_first_token_equal}
        engine.close(parent.id)
        say(f"fork at layer {mid}: {fork_ms:.2f} ms vs remaining layers alone {tail_ms:.2f} ms "
            f"({fork_ms / tail_ms:.2f}x), {repeats} repeats; first token equal: {fork_first_token_equal}")
        save()

    with Part(result, "offload"):
        # 4. offload / restore of a paused run
        run = engine.generate(prompt, n, breakpoints=[(mid, 2)])
        held = run.bytes_held()
        sync()
        t = time.perf_counter()
        engine.offload(run.id)
        sync()
        off_s = time.perf_counter() - t
        t = time.perf_counter()
        engine.resume(run.id)  # restores, then runs to the end
        sync()
        resume_s = time.perf_counter() - t
        while run.paused:
            engine.resume(run.id)
        result["offload"] = {"layer": mid, "step": 2, "bytes_held": held, "offload_s": off_s,
                             "restore_and_finish_s": resume_s, "tokens_equal": run.token_ids == ref}
        engine.close(run.id)
        say(f"offload of a paused run ({held / 2**20:.1f} MiB) {off_s * 1e3:.1f} ms; restore + finish {resume_s:.2f} s; "
            f"tokens equal: {run.token_ids == ref}")
    result["all_exact"] = bool(
        not result.get("errors") and result.get("pause_resume", {}).get("all_equal")
        and result.get("fork", {}).get("first_token_equal") and result.get("offload", {}).get("tokens_equal")
        and not engine.inexact_sites)
    save()
    say(f"written {path}; all exact: {result['all_exact']}")
    print(json.dumps({"all_exact": result["all_exact"], "written": str(path)}))
    return 0 if result["all_exact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
