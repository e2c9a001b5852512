"""Server benchmark (issue 3): tensor wire throughput vs a raw socket, and bytes sent per default step.

    python -m experiments.bench.server --out experiments/results/cpu-2core/bench_server
    python -m experiments.bench.server --out $OUT --device cuda:0      # on the GPU machine

Writes ``bench_server.json`` (numbers, predictions, versions, machine) and
``bench_server.md`` (the same as tables) into ``--out``. Runs from the
repository root of a checkout without installing (``-m`` puts the root on the
path); where rpyc is missing (the GPU image), install the carried wheels first:
``pip install --no-index --no-deps --target /tmp/site .whl/*.whl`` and put
``/tmp/site`` on ``PYTHONPATH``, as ``run_gpu_suite.sh`` does.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..exp3_whitebox.exp3lib.cli import add_generation_args

#: Written before measuring (see experiments/results/*/bench_server.md for the outcome).
PREDICTIONS = {
    "rpyc_inline": "about 4 copies of the payload each way inside brine/protocol plus wire's own; "
    "each 64 MB copy costs ~0.5x the raw socket here, so inline rpyc reaches ~0.2-0.35 of raw at 10-64 MB",
    "side_channel": "no user-space copy besides the socket: >= 0.8 of raw at 10-64 MB; "
    "below ~1 MB the extra connection and round trip make it slower than inline",
    "step_bytes": "a default step reply is JSON: ids, top-k, activation statistics with one norm per position: "
    "a few KB at seq 128, far under 64 KB",
}
SIZES = {"0.4MB": 393_216, "10MB": 10_000_000, "64MB": 64_000_000}


def versions() -> dict[str, Any]:
    import rpyc
    import transformers

    import djinn_nb

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rpyc": rpyc.__version__ if hasattr(rpyc, "__version__") else str(rpyc.version.version),
        "djinn_nb": djinn_nb.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_avg": os.getloadavg(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def bench_wire(sizes: dict[str, int], repeats: int) -> list[dict[str, Any]]:
    """Every path at every size, interleaved per size so that load changes hit all paths alike."""
    from .wire_paths import PATHS, YARDSTICK

    rows = []
    for label, n in sizes.items():
        times = {name: fn(n, repeats) for name, fn in PATHS.items()}
        for name, ts in times.items():
            med = statistics.median(ts)
            row = {"size": label, "bytes": n, "path": name, "median_ms": round(med * 1e3, 3),
                   "min_ms": round(min(ts) * 1e3, 3), "MB_per_s": round(n / med / 1e6, 1),
                   "times_ms": [round(t * 1e3, 3) for t in ts]}
            if name in YARDSTICK:
                raw = statistics.median(times[YARDSTICK[name]])
                row["vs_raw"] = round(raw / med, 3)
                row["yardstick"] = YARDSTICK[name]
            rows.append(row)
            print(f"  {label:>6} {name:16s} {row['median_ms']:9.2f} ms  {row['MB_per_s']:8.1f} MB/s"
                  + (f"  {row['vs_raw']:.2f} of raw" if "vs_raw" in row else ""), flush=True)
    return rows


def bench_step_bytes(model: str, device: str, seq: int, new_tokens: int, layer: int,
                     dtype: str | None = None) -> dict[str, Any]:
    """Bytes on the client's socket for each default call of a paused-at-every-step run."""
    from djinn_nb.client import Client
    from djinn_nb.serving.server import DjinnServer, build_engine

    t0 = time.perf_counter()
    engine = build_engine(model, device, dtype)
    load_s = time.perf_counter() - t0
    server = DjinnServer(engine, "127.0.0.1", 0).start()
    client = Client("127.0.0.1", server.port)
    stream = client._conn._channel.stream
    info = client.info
    prompt = torch.randint(0, info.get("vocab_size") or 50257, (seq,), generator=torch.Generator().manual_seed(0)).tolist()
    calls = []

    def measure(what: str, fn: Any) -> Any:
        b_in, b_out, t = stream.bytes_in, stream.bytes_out, time.perf_counter()
        result = fn()
        calls.append({"call": what, "bytes_to_client": stream.bytes_in - b_in,
                      "bytes_to_server": stream.bytes_out - b_out, "ms": round((time.perf_counter() - t) * 1e3, 2)})
        return result

    try:
        run = measure("generate (pauses at step 0)", lambda: client.generate(prompt, new_tokens, breakpoints=[(layer, "all")]))
        while run.paused:
            measure(f"resume (from step {run.step})", run.resume)
        plain = measure("generate, no breakpoints", lambda: client.generate(prompt, new_tokens))
        paused = client.generate(prompt, new_tokens, breakpoints=[layer])
        act = measure("activation() on request", paused.activation)
        logits = measure("logits() on request (last step, one position)", plain.logits)
        paused.close()
        run.close()
        plain.close()
    finally:
        client.close()
        server.close()
    steps = [c["bytes_to_client"] for c in calls if c["call"].startswith(("generate (", "resume"))]
    vocab = int(logits.numel())
    return {
        "model": model, "device": device, "seq": seq, "new_tokens": new_tokens, "layer": layer,
        "load_s": round(load_s, 2), "calls": calls,
        "default_step_bytes_max": max(steps), "default_step_bytes_mean": round(statistics.mean(steps)),
        "goal_bytes": 64 * 1024,
        "activation_bytes": act.numel() * act.element_size(),
        "full_logits_bytes_at_seq": seq * vocab * 4,
        "original_design_bytes_quoted_in_issue": 10_000_000,
    }


def markdown(result: dict[str, Any]) -> str:
    v = result["versions"]
    lines = [f"# bench_server ({v.get('gpus', [v['cpu_model']])[0]}, {v['cpus']} CPUs)", "",
             f"torch {v['torch']}, transformers {v['transformers']}, rpyc {v['rpyc']}, python {v['python']}, "
             f"load average at start {v['load_avg']}", "", "## Wire throughput (loopback)", "",
             "| size | path | median ms | MB/s | vs raw |", "| --- | --- | --- | --- | --- |"]
    for r in result.get("wire", []):
        lines.append(f"| {r['size']} | {r['path']} | {r['median_ms']} | {r['MB_per_s']} | {r.get('vs_raw', '')} |")
    sb = result.get("step_bytes")
    if sb:
        lines += ["", f"## Bytes per call, {sb['model']} on {sb['device']}, seq {sb['seq']}, breakpoint at layer {sb['layer']} every step", "",
                  "| call | bytes to client | bytes to server | ms |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['call']} | {c['bytes_to_client']} | {c['bytes_to_server']} | {c['ms']} |" for c in sb["calls"]]
        lines += ["", f"Default step: max {sb['default_step_bytes_max']} B, mean {sb['default_step_bytes_mean']} B "
                  f"(goal <= {sb['goal_bytes']} B); full logits at every position would be {sb['full_logits_bytes_at_seq']} B."]
    lines += ["", "## Predictions (written before measuring)", ""] + [f"- {k}: {p}" for k, p in PREDICTIONS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for bench_server.json and bench_server.md")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {list(SIZES)}")
    add_generation_args(p, device="cpu", new_tokens=4)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--skip-wire", action="store_true")
    p.add_argument("--skip-steps", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from ..exp3_whitebox.exp3lib.env import environment, model_dtype, write_json

    result: dict[str, Any] = {"versions": versions(), "predictions": PREDICTIONS, "args": vars(args),
                              "environment": environment(args.device, model_dtype(args.dtype, args.device, args.model))}
    if not args.skip_wire:
        print("wire throughput:", flush=True)
        result["wire"] = bench_wire({k: SIZES[k] for k in args.sizes.split(",")}, args.repeats)
    if not args.skip_steps:
        print("bytes per step:", flush=True)
        result["step_bytes"] = bench_step_bytes(args.model, args.device, args.seq, args.new_tokens, args.layer, args.dtype)
        print(json.dumps({k: v for k, v in result["step_bytes"].items() if k != "calls"}), flush=True)
    write_json(out / "bench_server.json", result)
    (out / "bench_server.md").write_text(markdown(result))
    print(f"wrote {out}/bench_server.json and bench_server.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
