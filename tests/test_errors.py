"""Bad input gets a clear error and loses nothing: the run stays paused and resumes exactly."""
from __future__ import annotations

import pytest
import torch

import djinn_nb
from djinn_nb.errors import (
    ActivationError,
    BadRequestError,
    BreakpointError,
    ExecutionError,
    NoTokenizerError,
    RunStateError,
    UnknownRunError,
    UnsupportedModelError,
)
from djinn_nb.core.reference import generate, hf_model

PROMPT = [9, 8, 7, 6, 5, 4]
N = 8


@pytest.fixture(scope="module")
def env(saved_models):
    path = saved_models["llama-tiny"]
    client = djinn_nb.connect(model=path)
    return client, generate(hf_model(path), PROMPT, N)


def paused(client):
    return client.generate(PROMPT, max_new_tokens=N, breakpoints=[6])


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"breakpoints": [12]}, BreakpointError, "layer 12 is out of range: this model has layers 0..11"),
        ({"breakpoints": [-1]}, BreakpointError, "out of range"),
        ({"breakpoints": [(3, 8)]}, BreakpointError, "step 8 is out of range: max_new_tokens=8"),
        ({"breakpoints": [(3, "sometimes")]}, BreakpointError, "must be an integer"),
        ({"breakpoints": [(1, 2, 3)]}, BreakpointError, "unknown site 3"),
        ({"breakpoints": [(1, 2, "mlp_out", 4)]}, BreakpointError, "(layer, step)"),
        ({"breakpoints": [(1, 0, "attn")]}, BreakpointError, "unknown site 'attn'"),
        ({"max_new_tokens": 0}, BadRequestError, "max_new_tokens must be a positive integer"),
        ({"watches": [40]}, BreakpointError, "out of range"),
    ],
)
def test_bad_generate_arguments(env, kwargs, error, words):
    client, _ = env
    before = {r["id"] for r in client.runs()}
    args = {"max_new_tokens": N, **kwargs}
    with pytest.raises(error, match=None) as info:
        client.generate(PROMPT, **args)
    assert words in str(info.value)
    assert {r["id"] for r in client.runs()} == before, "a refused generate must not leave a run behind"


def test_text_prompt_without_tokenizer(env):
    client, _ = env
    with pytest.raises(NoTokenizerError, match="no tokenizer: pass the prompt as a list of token ids"):
        client.generate("hello", max_new_tokens=2)


def test_token_id_out_of_vocabulary(env):
    client, _ = env
    with pytest.raises(BadRequestError, match="token id 512 is not an integer in 0..511"):
        client.generate([1, 512], max_new_tokens=2)


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda h: h[:, :-1], ActivationError, "has shape (1, 5, 64), the checkpoint at layer 6 step 0 has (1, 6, 64)"),
        (lambda h: h.double(), ActivationError, "dtype float64, the model runs in float32"),
        (lambda h: h.masked_fill(h > h.max() - 1e-3, float("nan")), ActivationError, "NaN or infinite"),
        (lambda h: h * float("inf"), ActivationError, "NaN or infinite"),
    ],
)
def test_bad_activation_loses_nothing(env, make, error, words):
    client, plain = env
    run = paused(client)
    other = paused(client)
    bad = make(run.activation())
    with pytest.raises(error) as info:
        run.resume(activation=bad)
    assert words in str(info.value)
    with pytest.raises(error):
        run.fork(activation=bad)
    assert run.refresh().paused and (run.layer, run.step) == (6, 0)
    assert run.resume().token_ids == plain
    assert other.resume().token_ids == plain


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"scale": float("nan")}, "scale must be a finite number"),
        ({"add": torch.ones(3)}, "add must have shape (64,) or (1, 6, 64), got (3,)"),
        ({"add": torch.full((64,), float("inf"))}, "finite floating-point"),
    ],
)
def test_bad_edits(env, kwargs, words):
    client, plain = env
    run = paused(client)
    with pytest.raises(ActivationError) as info:
        run.resume(**kwargs)
    assert words in str(info.value)
    assert run.resume().token_ids == plain


def test_bad_fork_length(env):
    client, plain = env
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(6, 3)])
    with pytest.raises(BadRequestError, match="must be an integer > 3"):
        run.fork(max_new_tokens=3)
    assert run.fork(max_new_tokens=5, breakpoints=[]).token_ids == plain[:5]
    assert run.resume().token_ids == plain


def test_resume_finished_closed_and_unknown_runs(env):
    client, plain = env
    done = client.generate(PROMPT, max_new_tokens=N)
    with pytest.raises(RunStateError, match=f"run {done.id} is done, not paused"):
        done.resume()
    with pytest.raises(RunStateError, match="not paused"):
        done.fork()
    with pytest.raises(RunStateError, match="not paused"):
        done.activation()
    run = paused(client)
    run_id = run.id
    run.close()
    assert run_id not in {r["id"] for r in client.runs()}
    with pytest.raises(UnknownRunError, match=f"no run '{run_id}'"):
        client.attach(run_id).resume()
    with pytest.raises(UnknownRunError, match="no run 'r999999'"):
        client.attach("r999999")
    assert done.token_ids == plain


def test_failure_during_execution_fails_only_that_run(env, saved_models):
    """A fault inside the model (as an out-of-memory would be) fails the run, frees it, spares others."""
    from djinn_nb.core.engine import Engine

    model = hf_model(saved_models["gpt2-tiny"])
    engine = Engine(model)
    keep = engine.generate(PROMPT, N, breakpoints=[4])
    victim = engine.generate(PROMPT, N, breakpoints=[4])
    block = engine.anatomy.blocks[8]

    def boom(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = block.register_forward_pre_hook(boom)
    try:
        with pytest.raises(ExecutionError, match=f"run {victim.id} failed: out of device memory"):
            engine.resume(victim.id)
    finally:
        handle.remove()
    assert victim.state == "failed" and victim.cache is None and victim.checkpoint is None
    with pytest.raises(RunStateError, match="is failed, not paused: out of device memory"):
        engine.resume(victim.id)
    assert engine.resume(keep.id).token_ids == generate(model, PROMPT, N)


def test_unknown_architecture_names_what_was_looked_for():
    from djinn_nb.core.engine import Engine

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(UnsupportedModelError, match=r"Odd: could not find the decoder blocks; looked for .*model\.layers, transformer\.h, gpt_neox\.layers"):
        Engine(Odd())


def test_connect_rejects_address_and_model_together():
    with pytest.raises(BadRequestError, match="either an address or model"):
        djinn_nb.connect("127.0.0.1:1", model="gpt2")
    with pytest.raises(BadRequestError, match="either an address or device/dtype=..., not both"):
        djinn_nb.connect("127.0.0.1:1", device="cuda:0", dtype="bfloat16")


def test_prompt_longer_than_the_model_positions(env):
    client, plain = env
    limit = client.info["max_positions"]
    with pytest.raises(BadRequestError, match=f"exceeds the model's {limit} positions"):
        client.generate([1] * (limit - 2), max_new_tokens=3)
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[6])
    with pytest.raises(BadRequestError, match=f"exceeds the model's {limit} positions"):
        run.fork(max_new_tokens=limit)
    assert run.resume().token_ids == plain


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"breakpoints": 3.5}, "breakpoints must be a list"),
        ({"breakpoints": ["--6"]}, "must be an integer"),
        ({"breakpoints": ["9" * 5000]}, "must be an integer"),
        ({"seed": 2**70, "temperature": 1.0}, "seed must be an integer in 0..2**63-1"),
        ({"temperature": 10**400}, "temperature must be a finite number"),
    ],
)
def test_hostile_numbers_are_bad_requests(env, kwargs, words):
    client, _ = env
    with pytest.raises(BadRequestError) as info:
        client.generate(PROMPT, max_new_tokens=N, **kwargs)
    assert words in str(info.value)


def test_edit_that_overflows_is_refused_and_changes_nothing(env):
    client, plain = env
    run = paused(client)
    before = run.activation()
    for bad in ({"scale": 3.4e38}, {"scale": 1e38, "add": torch.full((64,), 3.4e38)}):
        with pytest.raises(ActivationError, match="non-finite in float32 .overflow.; nothing was changed"):
            run.edit(**bad)
    assert torch.equal(run.activation(), before) and not run.refresh().activation_stats["edited"]
    assert run.resume().token_ids == plain


def test_an_int_scale_past_int64_is_applied_as_the_number_it_is(saved_models):
    """JSON carries any integer: one too large for torch's int64 scalar is a float like any other
    (applied, or refused as an overflow), never an internal error."""
    from djinn_nb.core.engine import Engine
    from djinn_nb.core.specs import Edit

    engine = Engine(hf_model(saved_models["gpt2-tiny"]))
    run = engine.generate(PROMPT, N, breakpoints=[4])
    before = engine.activation(run.id).clone()
    engine.edit(run.id, Edit(scale=2**70))
    assert torch.equal(engine.activation(run.id), before * float(2**70))
    for big in (10**39, -(10**39)):  # past float32's range once applied
        with pytest.raises(ActivationError, match="non-finite in float32 .overflow.; nothing was changed"):
            engine.fork(run.id, Edit(scale=big), [])
    assert [r.id for r in engine.all_runs()] == [run.id]


def test_reset_of_an_offloaded_edited_run(env):
    client, plain = env
    run = paused(client)
    run.edit(scale=3.0)
    run.offload()
    run.reset()
    assert not run.activation_stats["edited"]
    assert run.resume().token_ids == plain


def test_generation_settings_the_engine_does_not_apply_are_reported():
    from djinn_nb.core.engine import Engine
    from djinn_nb.core.models import build_random

    model = build_random("gpt2-tiny")
    model.generation_config.repetition_penalty = 1.3
    engine = Engine(model)
    assert engine.info()["generation_config_ignored"] == ["repetition_penalty=1.3"]
    assert Engine(build_random("gpt2-tiny")).info()["generation_config_ignored"] == []


@pytest.mark.attack(cls="leaks", tried="a prompt with a lone surrogate", held="a BadRequestError, no traceback")
def test_a_text_that_is_not_valid_unicode_is_a_bad_request_not_an_internal_error():
    """JSON carries lone surrogates; the tokenizer took them as an internal error with a traceback."""
    import json

    client = djinn_nb.connect()  # the embedded SmolLM2 (a tokenizer), behind its loopback server
    for call, args in (("generate", (json.dumps({"prompt": "a\ud800b", "max_new_tokens": 2}),)),
                       ("lens_grid", (json.dumps({"prompt": "\udfff", "k": 1}),)),
                       ("generate", (json.dumps({"prompt": "hi", "max_new_tokens": 2,
                                                 "breakpoints": [{"layer": 0, "step": "all",
                                                                  "when": "token == '\ud800'"}]}),))):
        with pytest.raises(BadRequestError, match="not valid Unicode: a lone surrogate"):
            client._call(call, *args)


def test_a_token_text_too_long_to_be_one_token_is_refused_before_tokenizing():
    """An answer (or a condition's token) of 8 MB was tokenized whole, outside every limit (+1.2 GB)."""
    import json
    import time

    client = djinn_nb.connect()
    t0 = time.monotonic()
    with pytest.raises(BadRequestError, match="a token's text is at most 256 characters"):
        client._call("causal_trace", json.dumps({"clean": "a b", "corrupted": "a c", "answer": "ab c" * 2_000_000}))
    with pytest.raises(BadRequestError, match="token"):  # a condition's token text: refused as well
        client.generate("hi", max_new_tokens=2, breakpoints=[{"layer": 0, "step": "all", "when": f"token == '{'x' * 300}'"}])
    assert time.monotonic() - t0 < 10  # refused, not tokenized (that took 14 s)
