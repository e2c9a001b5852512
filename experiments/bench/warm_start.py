"""Warm start (issue 14, goal <= 3 s): ``djinn_nb.connect()`` of the embedded default, ready to generate.

    python -m experiments.bench.warm_start [--n 7] [--out experiments/results/cpu-2core/warm_start]

Each sample is a fresh Python process (nothing imported, the converted model already
cached under ``~/.cache/djinn_nb`` or ``$DJINN_CACHE``; run once cold first if it is
not): it times ``import djinn_nb`` (torch comes with it), then ``djinn_nb.connect()``
(transformers' imports, loading the safetensors and tokenizer, the exactness probe,
the embedded server and the client's hello), then one 3-token ``generate`` to show it
is ready. Reported: the median over processes of each, wall and CPU seconds, the
cyclic GC's time (paused during connect, see ``djinn_nb/core/gcpause.py``), and the
load average around them (this machine is shared: compare medians, and CPU seconds
when the load is high). One more process times the phases inside ``connect()`` one by one.
Writes ``warm_start.json`` with the machine, versions and commit.

djinn_nb's modules are byte-compiled first, as ``make install`` (``compileall``) and any
``pip install`` do: this machine sets ``PYTHONDONTWRITEBYTECODE=1``, so an editable checkout
would otherwise compile its ~40 modules from source at every start (~0.1 s), which no
installed copy does. ``--compare-uncompiled`` also times, in alternation with the samples,
processes importing a copy of the package without ``.pyc`` files: what that costs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import compileall
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import gc, json, os, resource, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
gc_s, gc_n, gc_t = [0.0], [0], [0.0]
def on_gc(phase, info):
    if phase == "start":
        gc_t[0] = time.perf_counter()
    else:
        gc_s[0] += time.perf_counter() - gc_t[0]
        gc_n[0] += 1
gc.callbacks.append(on_gc)
t0, c0 = time.perf_counter(), cpu()
import djinn_nb
t1, c1 = time.perf_counter(), cpu()
client = djinn_nb.connect(embedded=True)  # this process: the in-process warm start
t2, c2 = time.perf_counter(), cpu()
connect_gc = (gc_s[0], gc_n[0])
run = client.generate("The capital of France is", max_new_tokens=3)
t3, c3 = time.perf_counter(), cpu()
print("RESULT " + json.dumps({"import_s": t1 - t0, "connect_s": t2 - t1, "generate_s": t3 - t2,
    "import_cpu_s": c1 - c0, "connect_cpu_s": c2 - c1, "generate_cpu_s": c3 - c2,
    "connect_gc_s": connect_gc[0], "connect_gc_collections": connect_gc[1],
    "generate_gc_s": gc_s[0] - connect_gc[0], "text": run.text}), flush=True)
os._exit(0)
"""

PHASES = r"""
import json, os, sys, time
from djinn_nb.core.gcpause import paused_gc
paused = paused_gc()  # as connect() does: the collector is off from before torch's import to the server's start
paused.__enter__()
T = time.perf_counter
out = {}
t = T(); import torch; out["import torch"] = T() - t
t = T(); import djinn_nb; out["import djinn_nb (after torch)"] = T() - t
t = T(); from transformers import AutoModelForCausalLM, AutoTokenizer; out["import transformers (auto classes)"] = T() - t
from djinn_nb.core import models
t = T(); path = str(models.embedded_dir()); out["find the cached conversion"] = T() - t
t = T(); from transformers import AutoConfig; AutoConfig.from_pretrained(path); out["config (imports the llama config)"] = T() - t
t = T(); import transformers.models.llama.modeling_llama; out["import the llama modeling code"] = T() - t
t = T(); m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(); out["from_pretrained (safetensors)"] = T() - t
t = T(); tok = models.load_tokenizer(path); out["tokenizer"] = T() - t
from djinn_nb.core.engine import Engine
t = T(); e = Engine(m, tok, "embedded", check_exact=False); out["engine without the probe"] = T() - t
t = T(); e = Engine(m, tok, "embedded"); out["engine with the exactness probe"] = T() - t
from djinn_nb.serving.server import DjinnServer
from djinn_nb.client.connection import Client
t = T(); s = DjinnServer(e, "127.0.0.1", 0).start(); out["server start"] = T() - t
t = T(); paused.__exit__(None, None, None); out["end the GC pause"] = T() - t
t = T(); c = Client("127.0.0.1", s.port); out["client hello"] = T() - t
print("RESULT " + json.dumps(out), flush=True)
os._exit(0)
"""


def _child(code: str, first: Path | None = None) -> dict:
    """Run ``code`` in a fresh process (``first``: a folder put before the repository on its path)."""
    path = [str(first)] if first else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child failed (rc {p.returncode}): {p.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=7, help="fresh processes")
    p.add_argument("--out", default=None)
    p.add_argument("--compare-uncompiled", action="store_true",
                   help="also time a copy of djinn_nb without .pyc files, alternating with the samples")
    args = p.parse_args(argv)
    compileall.compile_dir(ROOT / "djinn_nb", quiet=1)  # what make install does
    bare = None
    if args.compare_uncompiled:
        bare = Path(tempfile.mkdtemp(prefix="djinn-uncompiled-"))
        shutil.copytree(ROOT / "djinn_nb", bare / "djinn_nb", ignore=shutil.ignore_patterns("__pycache__"))
    _child(CHILD)  # converts on a cold cache; warms the page cache either way
    load_before = os.getloadavg()
    samples, uncompiled = [], []
    for i in range(args.n):
        s = _child(CHILD)
        samples.append(s)
        print(f"  process {i + 1}/{args.n}: import {s['import_s']:.2f} s, connect {s['connect_s']:.2f} s "
              f"(cpu {s['connect_cpu_s']:.2f} s, GC {s['connect_gc_s']:.2f} s in {s['connect_gc_collections']} collections), "
              f"generate {s['generate_s']:.2f} s -> {s['text']!r}", flush=True)
        if bare is not None:
            u = _child(CHILD, first=bare)
            uncompiled.append(u)
            print(f"  uncompiled copy: connect {u['connect_s']:.2f} s (cpu {u['connect_cpu_s']:.2f} s)", flush=True)
    if bare is not None:
        shutil.rmtree(bare, ignore_errors=True)
    phases = _child(PHASES)
    load_after = os.getloadavg()
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0] if k != "text"}
    from ..exp3_whitebox.exp3lib.env import environment, write_json

    out = {
        "what": "djinn_nb.connect() of the embedded default (converted model cached) in fresh processes",
        "goal_connect_s": 3.0,
        "median": med,
        "connect_s_all": [s["connect_s"] for s in samples],
        "min_connect_s": min(s["connect_s"] for s in samples),
        "texts": sorted({s["text"] for s in samples}),
        "phases_one_process_s": phases,
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "processes": args.n,
        "byte_compiled": "djinn_nb compiled with compileall first, as make install does",
        **({"uncompiled_copy": {
            "what": "the same, importing a copy of djinn_nb without .pyc (PYTHONDONTWRITEBYTECODE=1 here), "
                    "each process right after a sample",
            "connect_s_all": [u["connect_s"] for u in uncompiled],
            "median_connect_s": statistics.median(u["connect_s"] for u in uncompiled),
            "median_connect_cpu_s": statistics.median(u["connect_cpu_s"] for u in uncompiled),
            "median_saved_by_compiling_s": statistics.median(u["connect_s"] - s["connect_s"]
                                                             for s, u in zip(samples, uncompiled)),
        }} if uncompiled else {}),
        "environment": environment("cpu", "float32"),  # the embedded default
    }
    print(f"median of {args.n}: import djinn_nb {med['import_s']:.2f} s; connect() {med['connect_s']:.2f} s "
          f"(cpu {med['connect_cpu_s']:.2f} s, of it GC {med['connect_gc_s']:.2f} s; goal <= 3 s); "
          f"first generate {med['generate_s']:.2f} s (cpu {med['generate_cpu_s']:.2f} s)")
    if uncompiled:
        print(f"uncompiled copy: connect() {out['uncompiled_copy']['median_connect_s']:.2f} s median; compiling saved "
              f"{out['uncompiled_copy']['median_saved_by_compiling_s']:.3f} s (median of the pairs)")
    for k, v in phases.items():
        print(f"  {k:40s} {v:.3f} s")
    print(f"load average before {load_before}, after {load_after}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "warm_start.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
