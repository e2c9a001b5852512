"""Batched forks and causal tracing, through the client to a ``djinn-server`` process (issue 10).

    python -m experiments.bench.patching --model random:gpt2 --device cuda:0 --layer 6 --seq 128 --out DIR

1. From one checkpoint (layer ``--layer``, prompt pass, ``--seq`` tokens), to the next token:
   one ``fork``, sixteen ``fork`` calls one after another, and one ``fork_many`` of sixteen,
   interleaved round by round. Goal: fork_many(16) <= 3x one fork. Beside them, two floors, in
   this process on the same random weights: the batch's remaining layers alone, replayed as the
   one CUDA graph ``fork_many`` captures (``graph_floor_ms``; issue 23's floor, goal: fork_many(16)
   <= 1.2x it; on a CPU, the batch's eager rest of step), and the later blocks' matrix products
   alone (``gemm_floor_ms``), for one fork and for sixteen.
2. A causal-tracing grid (every layer x ``--positions`` positions of a prompt pair differing at
   a few positions) three ways, in the same process and run: ``djinn_nb.causal_trace`` through
   the client; plain PyTorch forward hooks on this process's copy of the same random model, one
   full forward per cell; and nnsight (one trace per cell) where it can be imported.
   Goal: >= 5x faster than the hook loop. The grids' largest difference is recorded.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

import djinn_nb
from djinn_nb.core.architecture import find_anatomy
from djinn_nb.core.models import load_model
from djinn_nb.core.pause import Trace

from ..exp3_whitebox.exp3lib.cli import add_generation_args
from ..exp3_whitebox.exp3lib.env import environment, model_dtype, write_json
from ..exp3_whitebox.exp3lib.timing import Case, measure_interleaved, ratio, stats, sync
from ..harness.server_process import djinn_server

def gemm_floor_ms(model: torch.nn.Module, after_layer: int, tokens: int, rows: int, repeats: int = 20) -> float:
    """The time of the matrix products alone that finishing a prompt pass from ``after_layer`` takes
    for ``rows`` forks of ``tokens`` tokens: every linear map of the later blocks on (rows x tokens)
    inputs, then the head on ``rows`` last positions — on a GPU replayed as one CUDA graph (no launch
    cost). No exact implementation of the same math in this dtype can be faster than this."""
    anatomy = find_anatomy(model)
    weights = []
    for block in anatomy.blocks[after_layer + 1:]:
        for m in block.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, torch.nn.Linear):
                weights.append(w.t())
            elif type(m).__name__ == "Conv1D" and w is not None:  # GPT-2's (in, out) linear maps
                weights.append(w)
    head = anatomy.lm_head.weight.t()
    device = head.device
    xs = {w.shape[0]: torch.randn(rows * tokens, w.shape[0], device=device, dtype=w.dtype) for w in weights}
    last = torch.randn(rows, head.shape[0], device=device, dtype=head.dtype)

    def products() -> None:
        for w in weights:
            torch.mm(xs[w.shape[0]], w)
        torch.mm(last, head)

    run = products
    with torch.inference_mode():
        if device.type == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                products()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                products()
            run = graph.replay
        times = []
        for i in range(repeats + 3):
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1e3)
    return stats(times).median_ms


def graph_floor_ms(loaded: Any, prompt: list[int], layer: int, rows: int, repeats: int = 20) -> float:
    """The rest of the paused step for ``rows`` forks alone: on a GPU, the CUDA graph ``fork_many``
    (or, for one row, ``fork``) captures, replayed (copy in the starts, replay; what no fork can
    skip); on a CPU, the batch's eager ``continue_from``. From an engine in this process."""
    from djinn_nb.core import kvcache
    from djinn_nb.core.engine import Engine, ForkSpec
    from djinn_nb.core.specs import Edit

    engine = Engine(loaded.model, loaded.tokenizer, "floor")
    parent = engine.generate(prompt, 1, breakpoints=[layer])
    specs = [ForkSpec(Edit(scale=1.0 + 0.01 * i), [], None) for i in range(rows)]
    for _ in range(3):  # the second batch of a size captures its graph
        for run in engine.fork_many(parent.id, specs):
            engine.close(run.id)
    cp = parent.checkpoint
    assert cp is not None
    graph = cp.graphs.graph if rows == 1 else cp.graphs.batched.get(rows)
    start = torch.cat([cp.hidden] * rows)

    def rest() -> None:
        with torch.inference_mode():
            if graph is not None:
                graph.replay(start)
                return
            cache = kvcache.fork_cache(parent.cache)
            cache.batch_repeat_interleave(rows)
            a = kvcache.swap_cache(cp.args, parent.cache, cache)
            kw = kvcache.swap_cache(cp.kwargs, parent.cache, cache)
            engine.stepper.continue_from(cp.layer, cp.site, start, a, kw, {})

    times = []
    for i in range(repeats + 3):
        sync()
        t0 = time.perf_counter()
        rest()
        sync()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    engine.close(parent.id)
    return stats(times).median_ms


def trace_section(args: argparse.Namespace, client: Any, model: torch.nn.Module, vocab: int,
                  n_layers: int) -> dict[str, Any]:
    """The causal-tracing grid three ways, timed round by round; the grids' differences from the hooks'."""
    clean = _prompt(vocab, args.positions, 1)
    corrupt = list(clean)
    for i in (1, 2, 3):
        corrupt[i] = (clean[i] + 1) % vocab
    layers, positions = list(range(n_layers)), list(range(args.positions))
    with torch.inference_mode():
        answer = int(model(torch.tensor([clean], device=model.device)).logits[0, -1].argmax())
    frames: dict[str, Any] = {}
    times: dict[str, list[float]] = {"djinn_causal_trace": [], "torch_hooks_batched_per_layer": [],
                                     "torch_hooks_full_forward_per_cell": [], "nnsight_trace_per_cell": []}
    nnsight_ok = True
    if getattr(args, "no_per_cell", False):  # the per-cell loops take minutes on a CPU
        del times["torch_hooks_full_forward_per_cell"], times["nnsight_trace_per_cell"]
    for _ in range(args.trace_repeats + 1):  # the first round warms up
        for name in list(times):
            if name == "nnsight_trace_per_cell" and not nnsight_ok:
                continue
            sync()
            t0 = time.perf_counter()
            if name == "djinn_causal_trace":
                grid = djinn_nb.causal_trace(client, clean, corrupt, answer=answer, progress=False).to_numpy().tolist()
            elif name == "torch_hooks_full_forward_per_cell":
                grid = hook_grid(model, clean, corrupt, answer, layers, positions)
            elif name == "torch_hooks_batched_per_layer":
                grid = batched_hook_grid(model, clean, corrupt, answer, layers, positions)
            else:
                grid = nnsight_grid(model, clean, corrupt, answer, layers, positions)
                nnsight_ok = grid is not None
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
            frames[name] = grid
    trace_ms = {k: stats(v[1:]).as_dict() for k, v in times.items() if len(v) > 1}
    ref = torch.tensor(frames.get("torch_hooks_full_forward_per_cell", frames["torch_hooks_batched_per_layer"]))
    diffs = {k: float((torch.tensor(v) - ref).abs().max()) for k, v in frames.items() if v is not None}
    djinn_ms = trace_ms["djinn_causal_trace"]["median_ms"]
    return {
        "trace": {"layers": len(layers), "positions": len(positions), "cells": len(layers) * len(positions),
                  "answer": answer, "ms": trace_ms, "max_abs_diff_vs_hooks": diffs,
                  "nnsight": "ran" if nnsight_ok else "not importable here"},
        "hooks_over_djinn": ratio(trace_ms.get("torch_hooks_full_forward_per_cell", {}).get("median_ms"), djinn_ms),
        "batched_hooks_over_djinn": ratio(trace_ms["torch_hooks_batched_per_layer"]["median_ms"], djinn_ms),
        "nnsight_over_djinn": ratio(trace_ms.get("nnsight_trace_per_cell", {}).get("median_ms"), djinn_ms),
    }


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _clean_outputs(model: torch.nn.Module, blocks: Any, layers: list[int], clean: list[int]) -> dict[int, torch.Tensor]:
    """Every traced block's output in one clean forward (plain forward hooks)."""
    traces = [Trace(blocks[layer]) for layer in layers]
    for t in traces:
        t.__enter__()
    try:
        model(torch.tensor([clean], device=next(model.parameters()).device))
    finally:
        for t in traces:
            t.__exit__(None, None, None)
    return {layer: t.value.clone() for layer, t in zip(layers, traces)}


def hook_grid(model: torch.nn.Module, clean: list[int], corrupt: list[int], answer: int, layers: list[int],
              positions: list[int]) -> list[list[float]]:
    """The grid with plain forward hooks: one clean forward recording every block, then one full
    forward of the corrupted prompt per cell with the block's output overwritten at one position."""
    blocks = find_anatomy(model).blocks
    device = next(model.parameters()).device
    with torch.inference_mode():
        clean_h = _clean_outputs(model, blocks, layers, clean)
        x = torch.tensor([corrupt], device=device)
        grid = []
        for layer in layers:
            row = []
            for p in positions:
                def write(h: torch.Tensor, p: int = p, layer: int = layer) -> torch.Tensor:
                    h = h.clone()
                    h[:, p] = clean_h[layer][:, p]
                    return h

                with Trace(blocks[layer], edit=write):
                    logits = model(x).logits[0, -1]
                row.append(torch.softmax(logits.float(), -1)[answer])
            grid.append(torch.stack(row))
        return torch.stack(grid).tolist()


def batched_hook_grid(model: torch.nn.Module, clean: list[int], corrupt: list[int], answer: int, layers: list[int],
                      positions: list[int]) -> list[list[float]]:
    """The baseline a careful researcher writes: one clean forward recording every block, then per
    layer ONE forward of a batch of the corrupted prompt, row i with the block's output overwritten
    at positions[i] (inference mode, nothing recomputed that the batch does not need)."""
    blocks = find_anatomy(model).blocks
    device = next(model.parameters()).device
    with torch.inference_mode():
        clean_h = _clean_outputs(model, blocks, layers, clean)
        x = torch.tensor([corrupt] * len(positions), device=device)
        rows = torch.arange(len(positions), device=device)
        cols = torch.tensor(positions, device=device)
        grid = []
        for layer in layers:
            def write(h: torch.Tensor, layer: int = layer) -> torch.Tensor:
                h = h.clone()
                h[rows, cols] = clean_h[layer][0, cols]
                return h

            with Trace(blocks[layer], edit=write):
                logits = model(x).logits[:, -1]
            grid.append(torch.softmax(logits.float(), -1)[:, answer])
        return torch.stack(grid).tolist()


def nnsight_grid(model: torch.nn.Module, clean: list[int], corrupt: list[int], answer: int, layers: list[int],
                 positions: list[int]) -> list[list[float]] | None:
    """The same grid with nnsight (one trace per cell), or None where nnsight is not installed."""
    try:
        from nnsight import NNsight
    except Exception:  # noqa: BLE001 - not installed, or fails to import with this torch
        return None
    anatomy = find_anatomy(model)
    device = next(model.parameters()).device
    wrapped = NNsight(model)
    blocks = wrapped
    for part in anatomy.block_path.split("."):
        blocks = getattr(blocks, part)
    clean_x, corrupt_x = torch.tensor([clean], device=device), torch.tensor([corrupt], device=device)
    with torch.inference_mode():
        saved = []
        with wrapped.trace(clean_x):
            for layer in layers:
                saved.append(_first(blocks[layer].output).save())
        clean_h = [_value(s) for s in saved]
        grid = []
        for li, layer in enumerate(layers):
            row = []
            for p in positions:
                with wrapped.trace(corrupt_x):
                    _first(blocks[layer].output)[:, p] = clean_h[li][:, p]
                    probs = wrapped.output.logits[0, -1].float().softmax(-1)[answer].save()
                row.append(float(_value(probs)))
            grid.append(row)
    return grid


def _first(output: Any) -> Any:
    """A block's hidden state inside an nnsight trace: transformers 5 blocks return a tensor,
    older ones a tuple whose first element it is."""
    try:
        return output[0] if isinstance(output, tuple) else output
    except Exception:  # noqa: BLE001
        return output


def _value(saved: Any) -> Any:
    return getattr(saved, "value", saved)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_args(p, new_tokens=None)  # forks and grids run to one token
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--forks", type=int, default=16)
    p.add_argument("--positions", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--trace-repeats", type=int, default=3)
    p.add_argument("--no-trace", action="store_true", help="only the forks (and the floor), no causal-tracing grid")
    p.add_argument("--out", default="experiments/out/patching")
    args = p.parse_args(argv)
    with djinn_server(args.model, args.device, args.dtype) as address:
        client = djinn_nb.connect(address)
        vocab, n_layers = client.info["vocab_size"], client.info["num_layers"]

        # 1. fork_many vs single forks, to the next token
        prompt = _prompt(vocab, args.seq, 0)
        parent = client.generate(prompt, max_new_tokens=1, breakpoints=[args.layer])
        scales = [1.0 + 0.01 * i for i in range(args.forks)]

        server_parts: dict[str, list[dict[str, float]]] = {}  # the server's own timings of a call's first fork

        def close_all(runs: Any) -> None:
            for r in runs if isinstance(runs, list) else [runs]:
                r.close()

        def noting(case: str) -> Any:
            def teardown(runs: Any) -> None:
                server_parts.setdefault(case, []).append(dict((runs[0] if isinstance(runs, list) else runs).timings_ms))
                close_all(runs)
            return teardown

        res = measure_interleaved(
            {
                "one_fork": Case(lambda _: parent.fork(scale=1.0, breakpoints=[]), teardown=noting("one_fork")),
                f"{args.forks}_forks_one_by_one": Case(
                    lambda _: [parent.fork(scale=s, breakpoints=[]) for s in scales], teardown=close_all),
                f"fork_many_{args.forks}": Case(
                    lambda _: parent.fork_many([{"scale": s, "breakpoints": []} for s in scales]),
                    teardown=noting(f"fork_many_{args.forks}")),
            },
            warmup=3,
            repeats=args.repeats,
        )
        singles = [parent.fork(scale=s, breakpoints=[]) for s in scales]
        batched = parent.fork_many([{"scale": s, "breakpoints": []} for s in scales])
        tokens_equal = [a.token_ids == b.token_ids for a, b in zip(singles, batched)]
        close_all(singles + batched)
        parent.close()
        one = res["one_fork"][0]
        seq_ = res[f"{args.forks}_forks_one_by_one"][0]
        many = res[f"fork_many_{args.forks}"][0]

        loaded = load_model(args.model, device=args.device, dtype=args.dtype)
        model = loaded.model
        floor_one = gemm_floor_ms(model, args.layer, args.seq, 1)
        floor_many = gemm_floor_ms(model, args.layer, args.seq, args.forks)
        graph_one = graph_floor_ms(loaded, prompt, args.layer, 1)
        graph_many = graph_floor_ms(loaded, prompt, args.layer, args.forks)
        out = {
            "benchmark": "batched forks and causal tracing through the client to a djinn-server subprocess",
            "model": args.model, "dtype": args.dtype, "layer": args.layer, "seq_len": args.seq,
            "environment": environment(args.device, model_dtype(args.dtype, args.device, args.model)),
            "fork_ms": {k: v[0].as_dict() for k, v in res.items()},
            "fork_many_over_one_fork": ratio(many.median_ms, one.median_ms),
            "one_by_one_over_one_fork": ratio(seq_.median_ms, one.median_ms),
            "fork_many_tokens_equal_single_forks": tokens_equal,
            "gemm_floor_ms": {"one": floor_one, f"many_{args.forks}": floor_many,
                              "what": "the later blocks' matrix products alone (one CUDA graph on a GPU)"},
            "gemm_floor_many_over_one_fork": ratio(floor_many, one.median_ms),
            "graph_floor_ms": {"one": graph_one, f"many_{args.forks}": graph_many,
                               "what": "the batch's remaining layers and head alone, replayed as the CUDA graph "
                                       "fork_many captures (on a CPU: its eager rest of step)"},
            "fork_many_over_graph_floor": ratio(many.median_ms, graph_many),
            "one_fork_over_graph_floor": ratio(one.median_ms, graph_one),
            # what a call costs beyond its layers, and what the 15 more forks cost beyond theirs
            "fixed_call_ms": one.median_ms - graph_one,
            "server_timings_ms": {case: {k: stats([p.get(k, 0.0) for p in parts]).median_ms for k in parts[-1]}
                                  for case, parts in server_parts.items()},
            "fork_many_beyond_one_fork_over_floor_beyond": ratio(many.median_ms - one.median_ms, graph_many - graph_one),
        }
        if not args.no_trace:
            out.update(trace_section(args, client, model, vocab, n_layers))
        client.close()
    dtype = str(model_dtype(args.dtype, args.device, args.model)).replace("torch.", "")
    name = f"bench_patching_{args.model.replace(':', '_')}_L{args.layer}_s{args.seq}_{dtype}.json"
    write_json(Path(args.out) / name, out)
    print(f"{args.model}: one fork {one.median_ms:.2f} ms, {args.forks} one by one {seq_.median_ms:.2f} ms "
          f"({out['one_by_one_over_one_fork']:.1f}x), fork_many({args.forks}) {many.median_ms:.2f} ms "
          f"({out['fork_many_over_one_fork']:.2f}x); tokens equal: {all(tokens_equal)}; the {args.forks} forks' "
          f"matrix products alone {floor_many:.2f} ms ({out['gemm_floor_many_over_one_fork']:.2f}x one fork); "
          f"graph floor one {graph_one:.2f} ms, {args.forks} {graph_many:.2f} ms: fork_many/floor "
          f"{out['fork_many_over_graph_floor']:.2f}x, beyond one fork "
          f"{out['fork_many_beyond_one_fork_over_floor_beyond']:.2f}x")
    if "trace" in out:
        t = out["trace"]
        print(f"trace {t['layers']}x{t['positions']}: " + ", ".join(f"{k} {v['median_ms']:.0f} ms" for k, v in t["ms"].items())
              + f"; hooks/djinn {out['hooks_over_djinn']:.1f}x; max |diff| {t['max_abs_diff_vs_hooks']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
