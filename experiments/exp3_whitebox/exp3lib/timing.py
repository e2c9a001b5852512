"""Honest wall-clock timing: synchronize the GPU(s) around each sample, warm up, keep the median."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch


def sync() -> None:
    """Wait for every CUDA device (a model split by ``device_map`` spans several)."""
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


@dataclass
class Stats:
    """Milliseconds over ``n`` samples."""

    median_ms: float
    mean_ms: float
    min_ms: float
    p90_ms: float
    n: int
    samples_ms: list[float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stats(samples_ms: list[float]) -> Stats:
    if not samples_ms:
        raise ValueError("no samples")
    ordered = sorted(samples_ms)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return Stats(
        median_ms=statistics.median(ordered),
        mean_ms=statistics.fmean(ordered),
        min_ms=ordered[0],
        p90_ms=p90,
        n=len(ordered),
        samples_ms=[round(s, 4) for s in samples_ms],
    )


@dataclass
class Case:
    """One thing to time: ``fn(setup())``, then ``teardown(result)``; setup/teardown are untimed."""

    fn: Callable[[Any], Any]
    setup: Callable[[], Any] | None = None
    teardown: Callable[[Any], None] | None = None


def measure_interleaved(cases: dict[str, Case], warmup: int, repeats: int) -> dict[str, tuple[Stats, list[Any]]]:
    """Time several cases side by side: each round runs every case once, so drift and
    noise fall on all of them alike and their ratios stay fair. Returns, per case,
    the statistics of ``repeats`` samples (after ``warmup`` rounds) and ``fn``'s results."""
    samples: dict[str, list[float]] = {k: [] for k in cases}
    results: dict[str, list[Any]] = {k: [] for k in cases}
    for i in range(warmup + repeats):
        for name, case in cases.items():
            arg = case.setup() if case.setup else None
            sync()
            t0 = time.perf_counter()
            out = case.fn(arg)
            sync()
            dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                samples[name].append(dt)
                results[name].append(out)
            if case.teardown:
                case.teardown(out)
    return {k: (stats(samples[k]), results[k]) for k in cases}


def measure(
    fn: Callable[[Any], Any],
    warmup: int,
    repeats: int,
    setup: Callable[[], Any] | None = None,
    teardown: Callable[[Any], None] | None = None,
) -> tuple[Stats, list[Any]]:
    """Time ``fn(setup())`` ``repeats`` times after ``warmup`` untimed calls (see ``measure_interleaved``)."""
    return measure_interleaved({"fn": Case(fn, setup, teardown)}, warmup, repeats)["fn"]


def ratio(num: float | None, den: float | None) -> float | None:
    return None if not num or not den else num / den
