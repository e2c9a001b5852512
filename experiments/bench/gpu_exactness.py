"""Exactness on the GPU, as a result file: runs the GPU tests (``tests/gpu/``: paused/resumed runs
and forks, eager, captured and replayed as CUDA graphs, against plain HF generate with the same
hook; the tail graph itself) and writes their outcome with the machine's versions.

    python -m experiments.bench.gpu_exactness --models random:gpt2 random:llama-7b --out DIR

The checks live in the tests (they skip without CUDA); this runner only records them in
``DIR/gpu_exactness.json``. Exits non-zero on any failure.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest

from ..exp3_whitebox.exp3lib.env import environment, write_json

TESTS = Path(__file__).resolve().parents[2] / "tests" / "gpu"


class _Record:
    """A pytest plugin that keeps each test's outcome."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.results.append({
                "check": report.nodeid.split("tests/gpu/", 1)[-1],
                "outcome": report.outcome,
                "ok": report.outcome == "passed",
                "seconds": round(report.duration, 3),
                "message": str(report.longrepr)[-2000:] if report.failed else None,
            })


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["random:gpt2", "random:llama-7b"])
    p.add_argument("--out", default="experiments/out/gpu_exactness")
    args = p.parse_args(argv)
    os.environ["DJINN_GPU_MODELS"] = " ".join(args.models)
    rec = _Record()
    rc = pytest.main(["-q", "-p", "no:cacheprovider", str(TESTS)], plugins=[rec])
    ok = rc == 0 and bool(rec.results) and all(r["ok"] for r in rec.results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gpu_exactness.json", {
        "environment": environment("cuda:0", "float32 and bfloat16 (each result names its own)"), "models": args.models, "results": rec.results, "all_ok": ok,
    })
    print(json.dumps({"all_ok": ok, "written": str(out / "gpu_exactness.json")}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
