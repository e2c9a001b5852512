"""The study's demos through the public client: steering, breakpoint trials, concurrent requests."""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch
from tqdm import tqdm

from .config import Exp3Config
from .metrics import kl_divergence, steering_effect, token_accuracy
from .session import Session, prompt_ids, vocab_size

log = logging.getLogger("exp3")


def edit_kwargs(cfg: Exp3Config, hidden_size: int) -> dict[str, Any]:
    """The client edit of the config's steering: ``scale=f`` or ``add=[f] * hidden``."""
    f = cfg.steering.modification_factor
    return {"scale": f} if cfg.steering.modification_type == "scale" else {"add": [f] * hidden_size}


def _decode(session: Session, ids: list[int]) -> str | None:
    return session.client.decode(ids) if session.engine.tokenizer is not None else None


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def steering_demo(session: Session, cfg: Exp3Config, prompt: list[int], layer: int, baseline: list[int]) -> dict[str, Any]:
    """Pause at ``(layer, 0)``, fork once unmodified and once steered, compare; then resume the original."""
    client = session.client
    n = cfg.max_new_tokens
    run = client.generate(prompt, n, [layer], record_logits=True)
    edit = edit_kwargs(cfg, int(client.info["hidden_size"]))
    unmod, unmod_ms = _timed(lambda: run.fork(breakpoints=[]))
    steered, steered_ms = _timed(lambda: run.fork(breakpoints=[], **edit))
    u_logits, s_logits = unmod.logits(0), steered.logits(0)
    effect = steering_effect(unmod.token_ids, steered.token_ids, u_logits, s_logits)
    same_context = effect["first_changed_position"]
    same_context = min(len(unmod.token_ids), len(steered.token_ids)) if same_context is None else same_context
    per_step_kl = [kl_divergence(unmod.logits(s), steered.logits(s)) for s in range(max(1, same_context))]
    run.resume()
    original_after = run.token_ids
    out = {
        "layer": layer,
        "step": 0,
        "modification_type": cfg.steering.modification_type,
        "modification_factor": cfg.steering.modification_factor,
        **effect,
        "kl_per_step_before_divergence": per_step_kl,
        "unmodified_token_ids": unmod.token_ids,
        "steered_token_ids": steered.token_ids,
        "unmodified_text": _decode(session, unmod.token_ids),
        "steered_text": _decode(session, steered.token_ids),
        "unmodified_fork_equals_unpaused_run": unmod.token_ids == baseline,
        "original_resumed_equals_unpaused_run": original_after == baseline,
        "fork_unmodified_ms": unmod_ms,
        "fork_steered_ms": steered_ms,
        "server_execute_ms": {"unmodified": unmod.timings_ms.get("execute"), "steered": steered.timings_ms.get("execute")},
    }
    for r in (unmod, steered, run):
        r.close()
    return out


def breakpoint_trials(
    session: Session, cfg: Exp3Config, prompt: list[int], layers: list[int], baseline: list[int], eager_ids: list[int]
) -> list[dict[str, Any]]:
    """Layers x trials: generate with breakpoints at ``layer`` (config's steps), resume each pause
    unmodified, and compare the tokens with the unpaused run and with plain PyTorch."""
    client = session.client
    n = cfg.max_new_tokens
    steps = cfg.breakpoint_steps()
    trials = []
    bar = tqdm(total=len(layers) * cfg.num_trials, desc="breakpoint trials", unit="trial")
    for layer in layers:
        for t in range(cfg.num_trials):
            plain, plain_ms = _timed(lambda: client.generate(prompt, n))
            plain.close()
            bps = [{"layer": layer, "step": s} for s in steps]
            t0 = time.perf_counter()
            run = client.generate(prompt, n, bps)
            first_pause_ms = (time.perf_counter() - t0) * 1e3
            pauses = []
            while run.paused:
                where = (run.layer, run.step)
                shape = (run.activation_stats or {}).get("shape")
                r0 = time.perf_counter()
                run.resume()
                rtt = (time.perf_counter() - r0) * 1e3
                execute = run.timings_ms.get("execute", 0.0)
                pauses.append({"layer": where[0], "step": where[1], "activation_shape": shape,
                               "resume_ms": rtt, "server_execute_ms": execute, "transport_ms": rtt - execute})
            total_ms = (time.perf_counter() - t0) * 1e3
            acc = token_accuracy(run.token_ids, baseline)
            trials.append({
                "layer": layer,
                "trial": t,
                "breakpoints": bps,
                "pauses": len(pauses),
                "token_accuracy": acc,
                "token_accuracy_vs_plain_pytorch": token_accuracy(run.token_ids, eager_ids),
                "token_ids": run.token_ids,
                "first_pause_ms": first_pause_ms,
                "total_ms": total_ms,
                "unpaused_ms": plain_ms,
                "overhead_pct": (total_ms / plain_ms - 1.0) * 100.0,
                "median_resume_ms": _median([p["resume_ms"] for p in pauses]),
                "median_transport_ms": _median([p["transport_ms"] for p in pauses]),
                "pause_detail": pauses,
            })
            log.debug("trial layer %d #%d: %d pauses, accuracy %.4f", layer, t, len(pauses), acc)
            run.close()
            bar.update(1)
    bar.close()
    return trials


def _median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def _device_bytes() -> int | None:
    if not torch.cuda.is_available():
        return None
    return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))


def concurrent_demo(session: Session, cfg: Exp3Config, prompt: list[int], layer: int, baseline: list[int]) -> dict[str, Any]:
    """Request A pauses at ``layer``; request B, on another connection, runs to its end meanwhile;
    A then resumes. Checks both outputs and reports what stayed on the server while A was paused."""
    n = cfg.max_new_tokens
    other = session.new_client()
    prompt_b = prompt_ids(cfg, session.engine.tokenizer, vocab_size(session.model), alternate=True)
    ref_b, b_alone_ms = _timed(lambda: other.generate(prompt_b, n))
    ref_b_ids = ref_b.token_ids
    ref_b.close()
    mem_before = _device_bytes()
    a, a_pause_ms = _timed(lambda: session.client.generate(prompt, n, [layer]))
    held, reply_bytes = a.bytes_held, len(json.dumps(a.summary))
    mem_paused = _device_bytes()
    b, b_during_ms = _timed(lambda: other.generate(prompt_b, n))
    act, fetch_ms = _timed(a.activation)
    _, resume_ms = _timed(a.resume)
    out = {
        "layer": layer,
        "request_a_paused": True,
        "request_b_completed_while_a_paused": b.done,
        "request_b_tokens_equal_alone": b.token_ids == ref_b_ids,
        "request_a_tokens_equal_unpaused_run": a.token_ids == baseline,
        "request_b_alone_ms": b_alone_ms,
        "request_b_while_a_paused_ms": b_during_ms,
        "request_a_generate_to_pause_ms": a_pause_ms,
        "request_a_resume_ms": resume_ms,
        "server_bytes_held_by_paused_a": held,
        "reply_bytes_to_client_at_pause": reply_bytes,
        "activation_fetch_bytes": act.numel() * act.element_size(),
        "activation_fetch_ms": fetch_ms,
        "device_bytes_allocated": {"before": mem_before, "a_paused": mem_paused, "after": _device_bytes()},
    }
    a.close()
    b.close()
    return out
