"""Run the exp3 GPU parts in one go, each in its own process, and pack the results for return.

    python -m experiments.exp3_whitebox.run_gpu_suite --out "$OUT" [--parts gpt2 mistral7b ...]

Parts (default: every single-GPU part, plus ``mistral7b_2gpu`` when two GPUs are visible):
  gpt2            run_exp3 on configs/gpt2_h100.yaml
  mistral7b       run_exp3 on configs/mistral7b_h100.yaml
  cost_gpt2       measure_checkpoint_cost on gpt2_h100.yaml, seq 128 and 512
  cost_mistral7b  measure_checkpoint_cost on mistral7b_h100.yaml, seq 128 and 1024
  mistral7b_2gpu  run_exp3 on configs/mistral7b_2gpu.yaml (device_map: auto)

A failing or timed-out part leaves the others' results. Every part writes under
``--work``; after each part the suite rewrites, in ``--out``, at most four files
(the device tool returns 8 files at most): ``exp3_gpu_results.tar.gz`` (the whole
work tree), ``exp3_gpu_combined.json`` (every result JSON, parsed, with each
part's exit code and time), ``exp3_gpu_tables.txt`` (the printed tables and the
cost lines) and ``suite.log``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from .exp3lib.env import environment, write_json

HERE = Path(__file__).resolve().parent

CFG = HERE / "configs"
PARTS: dict[str, list[str]] = {
    "gpt2": ["run_exp3", "--config", str(CFG / "gpt2_h100.yaml")],
    "mistral7b": ["run_exp3", "--config", str(CFG / "mistral7b_h100.yaml")],
    "cost_gpt2": ["measure_checkpoint_cost", "--config", str(CFG / "gpt2_h100.yaml"), "--seq-lens", "128", "512"],
    "cost_mistral7b": ["measure_checkpoint_cost", "--config", str(CFG / "mistral7b_h100.yaml"), "--seq-lens", "128", "1024"],
    "mistral7b_2gpu": ["run_exp3", "--config", str(CFG / "mistral7b_2gpu.yaml")],
}
MAX_FILE_BYTES = 16 * 1024 * 1024


def default_parts() -> list[str]:
    import torch

    parts = ["gpt2", "mistral7b", "cost_gpt2", "cost_mistral7b"]
    return parts + (["mistral7b_2gpu"] if torch.cuda.device_count() >= 2 else [])


def run_part(name: str, work: Path, timeout_s: float, log: Any) -> dict[str, Any]:
    """Run one part as a subprocess; its stdout/stderr go to ``work/name/console.log``."""
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    module, *rest = PARTS[name]
    cmd = [sys.executable, "-m", f"{__package__}.{module}", *rest, "--output-dir", str(out)]
    log(f"[{name}] {' '.join(cmd)} (timeout {timeout_s:.0f} s)")
    t0 = time.perf_counter()
    with open(out / "console.log", "w", encoding="utf-8") as console:
        try:
            rc = subprocess.run(cmd, stdout=console, stderr=subprocess.STDOUT, timeout=timeout_s, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    log(f"[{name}] exit {rc} after {wall:.1f} s")
    return {"command": cmd, "exit": rc, "wall_s": wall}


def _part_dirs(work: Path, parts: dict[str, dict[str, Any]]) -> list[str]:
    """This call's parts, then any left in ``work`` by an earlier call on the same machine."""
    earlier = sorted(d.name for d in work.iterdir() if d.is_dir() and d.name not in parts)
    return [*parts, *earlier]


def collect(work: Path, parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every result JSON under ``work``, parsed, by part."""
    out: dict[str, Any] = {}
    for name in _part_dirs(work, parts):
        meta = parts.get(name, {"exit": "from an earlier call"})
        files = {}
        for f in sorted((work / name).glob("*.json")):
            try:
                files[f.name] = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                files[f.name] = {"unreadable": str(e)}
        out[name] = {**meta, "files": files}
    return out


def tables(work: Path, parts: list[str]) -> str:
    chunks = []
    for name in parts:
        comp = work / name / "comparative_results.json"
        cost_log = work / name / "checkpoint_cost.log"
        if comp.is_file():
            data = json.loads(comp.read_text())
            chunks.append(f"== {name} ({data['environment']['device_name']})\n{data['table_text']}\ngoals: {json.dumps(data['goals'])}")
        elif cost_log.is_file():
            chunks.append(f"== {name}\n{cost_log.read_text()}")
        else:
            chunks.append(f"== {name}: no results (see its console.log in the tarball)")
    return "\n\n".join(chunks) + "\n"


def pack(work: Path, out: Path, parts: dict[str, dict[str, Any]], suite_log: list[str]) -> None:
    """(Re)write the four returned files; each stays under 16 MiB."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "exp3_gpu_results.tar.gz", "w:gz") as tar:
        tar.add(work, arcname="exp3_gpu_results")
    combined = {"environment": environment("cuda:0", "per part (each part records its own)"), "parts": collect(work, parts)}
    path = write_json(out / "exp3_gpu_combined.json", combined)
    if path.stat().st_size > MAX_FILE_BYTES:  # drop raw samples rather than lose the file
        text = json.dumps(combined)
        import re

        path.write_text(re.sub(r'"samples_ms": \[[^\]]*\]', '"samples_ms": []', text))
    (out / "exp3_gpu_tables.txt").write_text(tables(work, _part_dirs(work, parts)), encoding="utf-8")
    (out / "suite.log").write_text("\n".join(suite_log) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="where the (at most four) returned files go, e.g. $OUT")
    p.add_argument("--work", default="/tmp/exp3_gpu_work", help="where each part writes its full results")
    p.add_argument("--parts", nargs="*", default=None, choices=sorted(PARTS))
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting parts after this many seconds in all")
    p.add_argument("--part-timeout-s", type=float, default=300.0)
    args = p.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    parts = args.parts or default_parts()
    suite_log: list[str] = []

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        suite_log.append(line)

    start = time.perf_counter()
    done: dict[str, dict[str, Any]] = {}
    for name in parts:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 30:
            log(f"[{name}] not started: {left:.0f} s of the suite's budget left")
            done[name] = {"exit": "not started (budget)", "wall_s": 0.0}
            continue
        try:
            done[name] = run_part(name, work, min(args.part_timeout_s, left), log)
        except Exception as e:  # noqa: BLE001 - the suite must go on
            done[name] = {"exit": f"suite error: {type(e).__name__}: {e}", "wall_s": 0.0}
            log(f"[{name}] suite error: {e}")
        pack(work, out, done, suite_log)
    pack(work, out, done, suite_log)
    log(f"suite done in {time.perf_counter() - start:.1f} s: " + ", ".join(f"{k}={v['exit']}" for k, v in done.items()))
    return 0 if all(v["exit"] == 0 for v in done.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
