"""The cost measurements shared by run_exp3.py and measure_checkpoint_cost.py.

Each part of a pause/resume is timed separately, in one process, side by side:
checkpoint (capture at the pause), remaining layers alone (plain PyTorch), fork
in-process through the Engine, fork end to end through the client on loopback
(transport = client round trip minus the server's fork copy and execute time),
and whole generations with a breakpoint armed at every step versus none.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import torch

from . import eager
from .config import TimingConfig
from .metrics import token_accuracy
from .session import Session
from .timing import Case, Stats, measure, measure_interleaved, ratio, stats, sync


def _parts_mean(round_trips_ms: list[float], children: list[Any]) -> dict[str, float | None]:
    """Mean server parts of the client's forks and the rest of each round trip (transport)."""
    n = min(len(round_trips_ms), len(children))
    if n == 0:
        return {"fork_copy_ms": None, "execute_ms": None, "transport_ms": None, "total_ms": None}
    copy = [c.timings_ms.get("fork_copy", 0.0) for c in children[:n]]
    execute = [c.timings_ms.get("execute", 0.0) for c in children[:n]]
    total = list(round_trips_ms[:n])
    transport = [t - a - b for t, a, b in zip(total, copy, execute)]
    mean = lambda xs: sum(xs) / n  # noqa: E731
    return {"fork_copy_ms": mean(copy), "execute_ms": mean(execute), "transport_ms": mean(transport),
            "total_ms": mean(total)}


def _median(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def checkpoint_capture(session: Session, prompt: list[int], layer: int, timing: TimingConfig) -> Stats:
    """Time from block ``layer``'s output being computed until ``Engine.generate`` returns paused.

    A forward hook registered before the engine's own timestamps the block output
    (after a device sync); what follows is the pause: the engine's hook, the
    exception unwinding the model's forward, and storing the checkpoint.
    """
    engine = session.engine
    block = engine.anatomy.blocks[layer]
    stamp: dict[str, float] = {}

    def hook(_m: Any, _a: Any, _o: Any) -> None:
        sync()
        stamp["t"] = time.perf_counter()

    handle = block.register_forward_hook(hook)
    samples: list[float] = []
    try:
        for i in range(timing.warmup + timing.repeats):
            run = engine.generate(prompt, 1, [layer])
            sync()
            t_end = time.perf_counter()
            if not run.paused:
                raise RuntimeError(f"run did not pause at layer {layer}")
            engine.close(run.id)
            if i >= timing.warmup:
                samples.append((t_end - stamp["t"]) * 1e3)
    finally:
        handle.remove()
    return stats(samples)


def latency_breakdown(session: Session, prompt: list[int], layer: int, timing: TimingConfig) -> dict[str, Any]:
    """Every part of a pause and a restore at ``layer`` on the prompt pass, and the goal ratios.

    The remaining layers alone, the in-process fork, the client fork and the client
    resume are timed interleaved (one of each per round) so their ratios are fair.
    A fork continues a paused one-token run to its end: the remaining blocks, the
    head and picking the token, i.e. exactly the work of the reference.
    """
    engine, client = session.engine, session.client
    cp = checkpoint_capture(session, prompt, layer, timing)
    cap = eager.capture(session.model, engine.anatomy, prompt, layer)
    tail_setup, tail_run = eager.tail_runner(engine.anatomy, cap)
    e_parent = engine.generate(prompt, 1, [layer])
    c_parent = client.generate(prompt, 1, [layer])
    engine_children: list[Any] = []

    def engine_fork(_: Any) -> Any:
        child = engine.fork(e_parent.id, None, [])
        engine_children.append((child.id, child.timings.get("fork_copy", 0.0), child.timings.get("execute", 0.0)))
        return child

    try:
        res = measure_interleaved({
            "remaining_layers": Case(tail_run, tail_setup),
            "fork_engine": Case(engine_fork, teardown=lambda c: engine.close(c.id)),
            "fork_client": Case(lambda _: c_parent.fork(breakpoints=[]), teardown=lambda c: c.close()),
            "resume_client": Case(lambda r: r.resume(), setup=lambda: client.generate(prompt, 1, [layer]),
                                  teardown=lambda r: r.close()),
        }, timing.warmup, timing.repeats)
        check = engine.fork(e_parent.id, None, [])
        fork_logits = check.last_logits.detach().clone()
        engine.close(check.id)
    finally:
        engine.close(e_parent.id)
        c_parent.close()
    tail, tail_outs = res["remaining_layers"]
    fe, _ = res["fork_engine"]
    fc, c_children = res["fork_client"]
    rc, _ = res["resume_client"]
    e_parts = engine_children[-timing.repeats:]
    c_server = [c.timings_ms.get("fork_copy", 0.0) + c.timings_ms.get("execute", 0.0) for c in c_children]
    exact = torch.equal(fork_logits.to(tail_outs[-1].device), tail_outs[-1][0])
    return {
        "layer": layer,
        "block_device": session.block_devices()[layer],
        "seq_len": len(prompt),
        "checkpoint_ms": cp.as_dict(),
        "remaining_layers_alone_ms": tail.as_dict(),
        "fork_engine_ms": fe.as_dict(),
        "fork_engine_server_parts_ms": {
            "fork_copy_ms": _median([p[1] * 1e3 for p in e_parts]),
            "execute_ms": _median([p[2] * 1e3 for p in e_parts]),
        },
        "fork_client_ms": fc.as_dict(),
        "fork_client_server_parts_ms": {
            "fork_copy_ms": _median([c.timings_ms.get("fork_copy", 0.0) for c in c_children]),
            "execute_ms": _median([c.timings_ms.get("execute", 0.0) for c in c_children]),
        },
        "transport_ms": _median([rtt - s for rtt, s in zip(fc.samples_ms, c_server)]),
        # the same samples as means, which add up: fork_copy + execute + transport = total
        "fork_client_parts_mean_ms": _parts_mean(fc.samples_ms, c_children),
        "resume_client_ms": rc.as_dict(),
        "fork_logits_equal_remaining_layers_logits": bool(exact),
        "ratios": {
            "fork_engine_over_remaining_layers": ratio(fe.median_ms, tail.median_ms),
            "fork_client_over_remaining_layers": ratio(fc.median_ms, tail.median_ms),
        },
    }


def _generate_engine(session: Session, prompt: list[int], n: int, bps: list[Any] | None) -> tuple[Any, int]:
    engine = session.engine
    run, pauses = engine.generate(prompt, n, bps), 0
    while run.paused:
        engine.resume(run.id)
        pauses += 1
    return run, pauses


def _generate_client(
    session: Session, prompt: list[int], n: int, bps: list[Any] | None, watches: list[Any] | None = None
) -> tuple[Any, int]:
    run, pauses = session.client.generate(prompt, n, bps, watches=watches), 0
    while run.paused:
        run.resume()
        pauses += 1
    return run, pauses


def armed_overhead(session: Session, prompt: list[int], layer: int, n: int, timing: TimingConfig) -> dict[str, Any]:
    """Whole generations of ``n`` tokens, plain vs a breakpoint at ``(layer, every step)`` auto-resumed.

    Timed in-process through the Engine and end to end through the client; the
    four variants are interleaved within each round so drift hits them alike.
    """
    engine = session.engine
    armed = [{"layer": layer, "step": "all"}]

    def close(out: tuple[Any, int]) -> None:
        run = out[0]
        run.close() if hasattr(run, "close") else engine.close(run.id)

    res = measure_interleaved({
        "engine_plain": Case(lambda _: _generate_engine(session, prompt, n, None), teardown=close),
        "engine_armed": Case(lambda _: _generate_engine(session, prompt, n, armed), teardown=close),
        "client_plain": Case(lambda _: _generate_client(session, prompt, n, None), teardown=close),
        "client_armed": Case(lambda _: _generate_client(session, prompt, n, armed), teardown=close),
        # a watch records block `layer`'s output at every step without pausing: no round trips
        "client_watch": Case(lambda _: _generate_client(session, prompt, n, None, armed), teardown=close),
    }, timing.warmup, timing.generation_repeats)
    st = {k: v[0] for k, v in res.items()}
    tokens = {k: list(v[1][-1][0].token_ids) for k, v in res.items()}
    n_tok = len(tokens["engine_plain"])
    out: dict[str, Any] = {
        "layer": layer,
        "max_new_tokens": n,
        "tokens_generated": n_tok,
        "pauses_per_generation": res["engine_armed"][1][-1][1],
        "same_tokens_all_variants": len({tuple(t) for t in tokens.values()}) == 1,
        "token_accuracy_engine_armed": token_accuracy(tokens["engine_armed"], tokens["engine_plain"]),
        "token_accuracy_client_armed": token_accuracy(tokens["client_armed"], tokens["client_plain"]),
        "generation_ms": {k: v.as_dict() for k, v in st.items()},
        "tokens_per_s": {k: n_tok / (v.median_ms / 1e3) for k, v in st.items()},
    }
    for side, variant in (("engine", "armed"), ("client", "armed"), ("client", "watch")):
        name = f"{side}_{variant}"
        r = ratio(st[name].median_ms, st[f"{side}_plain"].median_ms)
        # Each round times every variant once: the median of the per-round ratios cancels
        # drift between rounds (clocks, other load) that a ratio of medians keeps.
        paired = statistics.median(
            a / b for a, b in zip(st[name].samples_ms, st[f"{side}_plain"].samples_ms) if b > 0
        )
        key = side if variant == "armed" else name
        out[f"{key}_armed_over_plain"] = r
        out[f"{key}_armed_over_plain_paired"] = paired
        out[f"{key}_overhead_pct"] = None if paired is None else (paired - 1.0) * 100.0
    return out


def tail_cuda_graph(session: Session, prompt: list[int], layer: int, timing: TimingConfig) -> dict[str, Any]:
    """Probe (CUDA only): blocks ``layer+1..`` + head replayed as one captured CUDA graph.

    Not what the engine does today; it sizes the headroom a graph fast path would
    give. The graph runs without the KV-cache write (``cache=None``: on the prompt
    pass the later blocks' cache is empty, so the logits are the same), since the
    dynamic cache allocates and concatenates in Python, which a graph cannot replay.
    """
    anatomy = session.engine.anatomy
    cap = eager.capture(session.model, anatomy, prompt, layer)
    setup, run = eager.tail_runner(anatomy, cap)
    eager_logits = run(setup())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run(None)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(None)
    st, _ = measure(lambda _: graph.replay(), timing.warmup, timing.repeats)
    eager_nocache, _ = measure(run, timing.warmup, timing.repeats, setup=lambda: None)
    return {
        "layer": layer,
        "graph_replay_ms": st.as_dict(),
        "eager_without_cache_write_ms": eager_nocache.as_dict(),
        "graph_logits_equal_eager_with_cache": bool(torch.equal(static_out, eager_logits)),
    }
