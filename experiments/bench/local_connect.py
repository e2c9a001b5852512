"""``connect()`` of the local server from fresh processes (issue 21 item 5: ≤ 1 s, imports included).

    python -m experiments.bench.local_connect [--n 7] [--model embedded] [--out FILE]

Starts the local server of ``--model`` once (in a private ``DJINN_HOME``, stopped at the end), then
times ``n`` fresh interpreters, each from its first line: ``import djinn_nb``, ``connect()``, and a
3-token generate of text (tokenized and decoded on the server), and says whether torch or
transformers were imported in the client. Beside it, the same in-process with ``embedded=True``
(today's warm start: imports + model load), for one fresh process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..exp3_whitebox.exp3lib.env import environment, write_json

ROOT = Path(__file__).resolve().parents[2]
WORKER = """
import time; t0 = time.perf_counter()
import json, sys
import djinn_nb
t1 = time.perf_counter()
client = djinn_nb.connect(model={model!r}, embedded={embedded})
t2 = time.perf_counter()
run = client.generate("The capital of France is", max_new_tokens=3)
text = run.text
t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "connect_s": t2 - t1, "ready_s": t2 - t0, "first_generate_s": t3 - t2,
                  "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}}))
"""


def fresh(model: str | None, embedded: bool, env: dict[str, str]) -> dict:
    code = WORKER.format(model=model, embedded=embedded)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=7)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    home = tempfile.mkdtemp(prefix="djinn-home-")
    env = {**os.environ, "DJINN_HOME": home, "PYTHONPATH": str(ROOT)}
    from djinn_nb.serving import localhome

    try:
        t = time.perf_counter()
        first = fresh(args.model, False, env)  # starts the server
        first["wall_s"] = time.perf_counter() - t
        runs = [fresh(args.model, False, env) for _ in range(args.n)]
        embedded = fresh(args.model, True, env)
    finally:
        localhome.stop_all(Path(home))
    med = {k: statistics.median(r[k] for r in runs) for k in ("import_s", "connect_s", "ready_s", "first_generate_s")}
    out = {"environment": environment("cpu", "float32"), "what": "connect() of a running local server from fresh processes; beside it connect(embedded=True)",
           "model": args.model or "embedded", "n": args.n, "cpus": os.cpu_count(), "load": os.getloadavg(),
           "first_start": first, "median": med, "max_ready_s": max(r["ready_s"] for r in runs),
           "client_imported_torch": any(r["torch"] or r["transformers"] for r in runs), "runs": runs,
           "embedded_fresh_process": embedded}
    print(f"local server, median of {args.n} fresh processes: ready in {med['ready_s']:.3f} s "
          f"(import {med['import_s']:.3f} s, connect {med['connect_s']:.3f} s; max {out['max_ready_s']:.3f} s), "
          f"a 3-token generate {med['first_generate_s']:.3f} s; torch in the client: {out['client_imported_torch']}. "
          f"First start (server start + model load) {first['ready_s']:.1f} s. connect(embedded=True) in a fresh "
          f"process: ready in {embedded['ready_s']:.2f} s")
    if args.out:
        write_json(args.out, out)


if __name__ == "__main__":
    main()
