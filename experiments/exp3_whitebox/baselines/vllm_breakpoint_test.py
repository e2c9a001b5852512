"""Baseline: what vLLM's API can and cannot do for breakpoint debugging, and, where vLLM is
installed, its generation time for the same prompt.

vLLM runs each forward pass to its end inside its engine; its public API has no
way to stop a request after decoder block N, hand the hidden state to the
caller, and continue that same request from an edited state. Where vLLM is not
installed (this repository's CPU machines and the GPU image have none), the
result file says so and why, and the comparison shows vLLM as not run.

    python -m experiments.exp3_whitebox.baselines.vllm_breakpoint_test \\
        --config experiments/exp3_whitebox/configs/gpt2_h100.yaml --output-dir /tmp/x
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


from ..exp3lib.config import Exp3Config, load_config
from ..exp3lib.env import environment, model_dtype, write_json

RESULT_FILE = "vllm_results.json"

# What the public API offers, stated as capabilities for the breakpoint workflow.
API_CAPABILITIES: dict[str, dict[str, str | bool]] = {
    "pause_mid_forward_at_a_decoder_block": {
        "supported": False,
        "why": "LLM.generate / the OpenAI server run every forward pass to completion inside the "
        "engine's scheduler step; no API returns control to the caller between decoder blocks.",
    },
    "read_hidden_state_of_block_n": {
        "supported": False,
        "why": "outputs carry token ids, text and (prompt) logprobs; intermediate residual-stream "
        "activations are not part of the request output.",
    },
    "resume_same_request_from_an_edited_activation": {
        "supported": False,
        "why": "a request's state (KV blocks in the paged cache) is internal to the engine; there is "
        "no call to inject an edited hidden state and continue from block N+1.",
    },
    "fork_a_request_from_a_mid_forward_checkpoint": {
        "supported": False,
        "why": "prefix caching reuses KV blocks of a shared token prefix, which is a fork at a token "
        "boundary, not at a layer inside a forward pass.",
    },
    "greedy_generation_and_logprobs": {
        "supported": True,
        "why": "SamplingParams(temperature=0, max_tokens=N, logprobs=k) gives the unmodified "
        "run's tokens and top-k log-probabilities, usable as an accuracy reference.",
    },
}


def vllm_available() -> tuple[bool, str]:
    """(installed, why not) without importing vLLM's heavy modules when absent."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed in this environment (importlib.util.find_spec('vllm') is None)"
    return True, ""


def _model_path(cfg: Exp3Config, model: Any | None, tmp: str) -> str:
    """A path vLLM can load: the config's hub id/directory, or the random model saved to ``tmp``."""
    source = cfg.model_source or ""
    if source.startswith("random:") or source == "embedded":
        if model is None:
            from ..exp3lib.session import load

            model = load(cfg)[0]
        model.save_pretrained(tmp)
        return tmp
    return source


def _time_vllm(cfg: Exp3Config, prompt: list[int], model: Any | None) -> dict[str, Any]:
    from vllm import LLM, SamplingParams  # type: ignore[import-not-found]

    with tempfile.TemporaryDirectory() as tmp:
        path = _model_path(cfg, model, tmp)
        llm = LLM(model=path, dtype=cfg.dtype or "auto", skip_tokenizer_init=True, gpu_memory_utilization=0.4)
        params = SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens, ignore_eos=False, detokenize=False)
        request = [{"prompt_token_ids": list(prompt)}]
        token_ids: list[int] = []
        samples = []
        for i in range(cfg.timing.warmup + cfg.timing.generation_repeats):
            t0 = time.perf_counter()
            out = llm.generate(request, params, use_tqdm=False)
            dt = (time.perf_counter() - t0) * 1e3
            token_ids = list(out[0].outputs[0].token_ids)
            if i >= cfg.timing.warmup:
                samples.append(dt)
        import vllm  # type: ignore[import-not-found]

        return {
            "vllm_version": getattr(vllm, "__version__", "unknown"),
            "generation_ms_median": statistics.median(samples),
            "generation_ms_samples": samples,
            "token_ids": token_ids,
        }


def run_vllm_test(cfg: Exp3Config, prompt: list[int], model: Any | None = None) -> dict[str, Any]:
    """The capability record, plus vLLM's greedy generation time where it is installed."""
    ok, why = vllm_available()
    result: dict[str, Any] = {
        "api_capabilities": API_CAPABILITIES,
        "mid_forward_pause_possible": False,
        "run": ok,
    }
    if not ok:
        result.update(reason=why, reason_short="vllm not installed")
        return result
    try:
        result["generation"] = _time_vllm(cfg, prompt, model)
    except Exception as e:  # noqa: BLE001 - vLLM fails in many environment-specific ways; record it
        result.update(run=False, reason=f"vLLM is installed but failed: {type(e).__name__}: {e}",
                      reason_short=f"vllm failed ({type(e).__name__})")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--model", default=None)
    args = p.parse_args(argv)
    cfg = load_config(args.config, model_source=args.model)
    prompt: list[int] = []
    if vllm_available()[0]:
        from ..exp3lib.session import load, prompt_ids, vocab_size

        model, tokenizer, _ = load(cfg)
        prompt = prompt_ids(cfg, tokenizer, vocab_size(model))
        result = run_vllm_test(cfg, prompt, model)
    else:
        result = run_vllm_test(cfg, prompt)
    result.update(config=cfg.as_dict(), environment=environment(cfg.device, model_dtype(cfg.dtype, cfg.device, cfg.model_source)))
    print(f"wrote {write_json(Path(args.output_dir) / RESULT_FILE, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
