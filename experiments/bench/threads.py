"""A 12-token generate of the embedded model on the CPU, with the machine idle and with two busy
processes beside it, for each way torch's OpenMP threads can wait (before and after the default
of ``djinn_nb/core/threads.py``).

    python -m experiments.bench.threads [--repeats 5] [--out experiments/results/cpu-2core/threads.json]

Each configuration runs in a fresh process (libgomp reads ``OMP_WAIT_POLICY`` once, when torch
loads): it loads the embedded SmolLM2 (fp32), warms up with one generate, then times ``repeats``
generates of 12 tokens through ``connect()``'s embedded server. "Busy" is two processes spinning
a Python loop (``python``) or two doing torch matmuls on one thread each (``torch``), as a CI runner
or a colleague's job would. The prediction: spinning waiters cost little idle and a lot under load
(the work's threads share two cores with two others that never yield).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    # name: environment (None: removed)
    "libgomp default (before)": {"OMP_WAIT_POLICY": None, "DJINN_IMPORT_TORCH_FIRST": "1"},
    "PASSIVE (djinn_nb default)": {"OMP_WAIT_POLICY": None},
    "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "PASSIVE, 1 thread": {"OMP_WAIT_POLICY": None, "DJINN_THREADS": "1"},
}
LOADS = {
    "idle": None,
    "2 busy python": "while True: pass",
    "2 busy torch": "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True: a @ a",
}

WORKER = """
import os, sys, time, json
if os.environ.get("DJINN_IMPORT_TORCH_FIRST"):
    import torch  # before djinn_nb: libgomp keeps its default policy
import djinn_nb
client = djinn_nb.connect(embedded=True)  # the threads of this process
client.generate("The capital of France is", max_new_tokens=12)
times = []
for _ in range(int(sys.argv[1])):
    t0 = time.perf_counter()
    client.generate("The capital of France is", max_new_tokens=12)
    times.append(time.perf_counter() - t0)
info = client.info
print("RESULT", json.dumps({"seconds": times, "threads": info["threads"], "policy": info["omp_wait_policy"],
                            "dtype": info["dtype"], "device": info["device"]}))
"""


def run_config(env_changes: dict[str, str | None], repeats: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_WAIT_POLICY", "DJINN_THREADS", "DJINN_IMPORT_TORCH_FIRST"):
        env.pop(k, None)
    for k, v in env_changes.items():
        if v is not None:
            env[k] = v
    p = subprocess.run([sys.executable, "-c", WORKER, str(repeats)], env=env, capture_output=True, text=True,
                       timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.split("RESULT ", 1)[1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="experiments/results/cpu-2core/threads.json")
    args = ap.parse_args(argv)
    from experiments.exp3_whitebox.exp3lib.env import environment

    results = []
    for load, code in LOADS.items():
        busy = [subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
                for _ in range(2 if code else 0)]
        try:
            time.sleep(1.0 if busy else 0)
            for name, env in CONFIGS.items():
                r = run_config(env, args.repeats)
                row = {"load": load, "config": name, **r, "median_s": statistics.median(r["seconds"]),
                       "loadavg_1min": os.getloadavg()[0]}
                results.append(row)
                print(f"{load:14s} {name:28s} median {row['median_s']:.2f} s  "
                      f"({', '.join(f'{s:.2f}' for s in r['seconds'])}; {r['threads']} threads, {r['policy']})",
                      flush=True)
        finally:
            for b in busy:
                b.kill()
    from experiments.exp3_whitebox.exp3lib.env import write_json

    out = Path(args.out)
    write_json(out, {
        "what": "seconds of one 12-token greedy generate of the embedded SmolLM2-135M (fp32, CPU) through "
                "connect()'s embedded server, per thread configuration and machine load",
        "model": "embedded SmolLM2-135M-Instruct", "dtype": "float32", "repeats": args.repeats,
        "environment": environment("cpu", "float32"), "results": results,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
