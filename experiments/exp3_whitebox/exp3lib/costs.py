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
from .timing import Stats, measure, ratio, stats, sync


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


def remaining_layers(session: Session, prompt: list[int], layer: int, timing: TimingConfig) -> tuple[Stats, torch.Tensor]:
    """Blocks ``layer+1..`` + final norm + head alone, from a captured input; and their logits."""
    anatomy = session.engine.anatomy
    cap = eager.capture(session.model, anatomy, prompt, layer)
    setup, run = eager.tail_runner(anatomy, cap)
    st, outs = measure(run, timing.warmup, timing.repeats, setup=setup)
    return st, outs[-1]


def fork_engine(session: Session, prompt: list[int], layer: int, timing: TimingConfig) -> dict[str, Any]:
    """In-process fork latency: ``Engine.fork`` of a paused one-token run, to its end."""
    engine = session.engine
    parent = engine.generate(prompt, 1, [layer])
    try:
        st, children = measure(lambda _: engine.fork(parent.id, None, []), timing.warmup, timing.repeats)
        parts = {
            "fork_copy_ms": _median([c.timings.get("fork_copy", 0.0) * 1e3 for c in children]),
            "execute_ms": _median([c.timings.get("execute", 0.0) * 1e3 for c in children]),
        }
        logits = children[-1].last_logits.detach().clone()
        for c in engine.runs():
            if c.parent == parent.id:
                engine.close(c.id)
    finally:
        engine.close(parent.id)
    return {"latency": st, "server_parts": parts, "logits": logits}


def fork_client(session: Session, prompt: list[int], layer: int, timing: TimingConfig) -> dict[str, Any]:
    """End-to-end fork latency through the client over loopback, with the server's own parts."""
    parent = session.client.generate(prompt, 1, [layer])
    try:
        st, children = measure(
            lambda _: parent.fork(breakpoints=[]), timing.warmup, timing.repeats,
            teardown=lambda c: c.close(),
        )
    finally:
        parent.close()
    server = [c.timings_ms.get("fork_copy", 0.0) + c.timings_ms.get("execute", 0.0) for c in children]
    transport = [rtt - s for rtt, s in zip(st.samples_ms, server)]
    return {
        "latency": st,
        "server_parts": {
            "fork_copy_ms": _median([c.timings_ms.get("fork_copy", 0.0) for c in children]),
            "execute_ms": _median([c.timings_ms.get("execute", 0.0) for c in children]),
        },
        "transport_ms": _median(transport),
    }


def resume_client(session: Session, prompt: list[int], layer: int, timing: TimingConfig) -> Stats:
    """End-to-end ``resume()`` latency of a paused one-token run (a new pause per sample, untimed)."""
    st, _ = measure(
        lambda r: r.resume(), timing.warmup, timing.repeats,
        setup=lambda: session.client.generate(prompt, 1, [layer]),
        teardown=lambda r: r.close(),
    )
    return st


def latency_breakdown(session: Session, prompt: list[int], layer: int, timing: TimingConfig) -> dict[str, Any]:
    """Every part of a pause and a restore at ``layer`` on the prompt pass, and the goal ratios."""
    cp = checkpoint_capture(session, prompt, layer, timing)
    tail, tail_logits = remaining_layers(session, prompt, layer, timing)
    fe = fork_engine(session, prompt, layer, timing)
    fc = fork_client(session, prompt, layer, timing)
    rc = resume_client(session, prompt, layer, timing)
    exact = torch.equal(fe["logits"].to(tail_logits.device), tail_logits[0])
    return {
        "layer": layer,
        "block_device": session.block_devices()[layer],
        "seq_len": len(prompt),
        "checkpoint_ms": cp.as_dict(),
        "remaining_layers_alone_ms": tail.as_dict(),
        "fork_engine_ms": fe["latency"].as_dict(),
        "fork_engine_server_parts_ms": fe["server_parts"],
        "fork_client_ms": fc["latency"].as_dict(),
        "fork_client_server_parts_ms": fc["server_parts"],
        "transport_ms": fc["transport_ms"],
        "resume_client_ms": rc.as_dict(),
        "fork_logits_equal_remaining_layers_logits": bool(exact),
        "ratios": {
            "fork_engine_over_remaining_layers": ratio(fe["latency"].median_ms, tail.median_ms),
            "fork_client_over_remaining_layers": ratio(fc["latency"].median_ms, tail.median_ms),
        },
    }


def _generate_engine(session: Session, prompt: list[int], n: int, bps: list[Any] | None) -> tuple[Any, int]:
    engine = session.engine
    run, pauses = engine.generate(prompt, n, bps), 0
    while run.paused:
        engine.resume(run.id)
        pauses += 1
    return run, pauses


def _generate_client(session: Session, prompt: list[int], n: int, bps: list[Any] | None) -> tuple[Any, int]:
    run, pauses = session.client.generate(prompt, n, bps), 0
    while run.paused:
        run.resume()
        pauses += 1
    return run, pauses


def armed_overhead(session: Session, prompt: list[int], layer: int, n: int, timing: TimingConfig) -> dict[str, Any]:
    """Whole generations of ``n`` tokens, plain vs a breakpoint at ``(layer, every step)`` auto-resumed.

    Timed in-process through the Engine and end to end through the client; the
    four variants alternate within each repeat so drift hits them alike.
    """
    armed = [{"layer": layer, "step": "all"}]
    variants = {
        "engine_plain": lambda: _generate_engine(session, prompt, n, None),
        "engine_armed": lambda: _generate_engine(session, prompt, n, armed),
        "client_plain": lambda: _generate_client(session, prompt, n, None),
        "client_armed": lambda: _generate_client(session, prompt, n, armed),
    }
    samples: dict[str, list[float]] = {k: [] for k in variants}
    pauses = 0
    tokens: dict[str, list[int]] = {}
    for i in range(timing.warmup + timing.generation_repeats):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            run, n_pauses = fn()
            sync()
            dt = (time.perf_counter() - t0) * 1e3
            tokens[name] = list(run.token_ids)
            if name == "engine_armed":
                pauses = n_pauses
            if hasattr(run, "close"):
                run.close()
            else:
                session.engine.close(run.id)
            if i >= timing.warmup:
                samples[name].append(dt)
    st = {k: stats(v) for k, v in samples.items()}
    n_tok = len(tokens["engine_plain"])
    out: dict[str, Any] = {
        "layer": layer,
        "max_new_tokens": n,
        "tokens_generated": n_tok,
        "pauses_per_generation": pauses,
        "same_tokens_all_variants": len({tuple(t) for t in tokens.values()}) == 1,
        "token_accuracy_engine_armed": token_accuracy(tokens["engine_armed"], tokens["engine_plain"]),
        "token_accuracy_client_armed": token_accuracy(tokens["client_armed"], tokens["client_plain"]),
        "generation_ms": {k: v.as_dict() for k, v in st.items()},
        "tokens_per_s": {k: n_tok / (v.median_ms / 1e3) for k, v in st.items()},
    }
    for side in ("engine", "client"):
        r = ratio(st[f"{side}_armed"].median_ms, st[f"{side}_plain"].median_ms)
        out[f"{side}_armed_over_plain"] = r
        out[f"{side}_overhead_pct"] = None if r is None else (r - 1.0) * 100.0
    return out


def tail_cuda_graph(session: Session, prompt: list[int], layer: int, timing: TimingConfig) -> dict[str, Any]:
    """Probe (CUDA only): blocks ``layer+1..`` + head replayed as one captured CUDA graph.

    Not what the engine does today; it sizes the headroom a graph fast path would give.
    """
    anatomy = session.engine.anatomy
    cap = eager.capture(session.model, anatomy, prompt, layer)
    setup, run = eager.tail_runner(anatomy, cap)
    eager_logits = run(setup())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run(setup())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    cache = setup()
    with torch.cuda.graph(graph):
        static_out = run(cache)
    st, _ = measure(lambda _: graph.replay(), timing.warmup, timing.repeats)
    return {
        "layer": layer,
        "graph_replay_ms": st.as_dict(),
        "graph_logits_equal_eager": bool(torch.equal(static_out, eager_logits)),
    }
