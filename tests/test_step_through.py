"""``run.step_through(n, **edit)``: the per-step batch form, against plain HF + a torch hook.

The hook scales block ``LAYER``'s output on its forward calls k .. k+n-1 (call 0 = the prompt
pass); the run, paused at (LAYER, step k), steps through n steps with ``scale`` on the server,
then resumes unmodified. Tokens must be equal, and it must cost one request.
"""
from __future__ import annotations

import pytest
import torch

import djinn_nb
from djinn_nb.core.reference import hf_model
from djinn_nb.core.architecture import find_anatomy
from djinn_nb.errors import ActivationError, BadRequestError, NonFiniteError, QuotaError, RunStateError
from experiments.harness.round_trips import count_requests

PROMPT = [5, 17, 42, 99, 3, 250, 11, 7]
N = 10
LAYER = 1


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def setup(request, saved_models):
    path = saved_models[request.param]
    return djinn_nb.connect(model=path, device="cpu"), hf_model(path)


def hooked(model, first: int, count: int, factor: float) -> list[int]:
    """Greedy generation with block LAYER's output scaled on forward calls first..first+count-1."""
    calls = [0]

    def hook(_module, _args, out):
        n = calls[0]
        calls[0] += 1
        if first <= n < first + count:
            h = out[0] if isinstance(out, tuple) else out
            h = h * factor
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return out

    handle = find_anatomy(model).blocks[LAYER].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([PROMPT]), max_new_tokens=N, do_sample=False)
    finally:
        handle.remove()
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("first,count", [(0, 1), (0, 4), (2, 3), (3, N)])
def test_step_through_equals_a_hook_editing_those_steps(setup, first, count):
    client, model = setup
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, first)])
    assert (run.paused, run.step) == (True, first)
    with count_requests(client) as sent:
        run.step_through(count, scale=0.3)
    assert sent.n == 1, sent
    if first + count < N:
        assert (run.paused, run.layer, run.step, run.site) == (True, LAYER, first + count, "resid_post")
    else:
        assert run.done
    run.run_to_end()
    want = hooked(model, first, count, 0.3)
    assert run.token_ids == want
    assert want != hooked(model, 0, 0, 1.0)  # the edit changes the tokens: the check can fail
    run.close()


def test_step_through_without_an_edit_is_next_step_n_times(setup):
    client, model = setup
    a = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, 1)])
    b = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, 1)])
    a.step_through(3)
    for _ in range(3):
        b.next_step()
    assert (a.step, a.layer) == (b.step, b.layer) == (4, LAYER)
    assert torch.equal(a.activation(), b.activation())
    assert a.run_to_end().token_ids == b.run_to_end().token_ids == hooked(model, 0, 0, 1.0)
    a.close()
    b.close()


def test_bad_step_through_requests_change_nothing(setup):
    client, _ = setup
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, 2)])
    before = run.activation()
    for steps in (0, -1, 1.5, True, "3"):
        with pytest.raises(BadRequestError, match="steps must be a positive integer"):
            run.step_through(steps, scale=0.5)
    with pytest.raises(ActivationError):
        run.step_through(2, add=[1.0, 2.0])  # the wrong width: refused before any step
    with pytest.raises((NonFiniteError, ActivationError), match="still paused at layer 1 step 2|nothing was changed"):
        run.step_through(3, scale=1e38)  # an overflow: refused at once, or the NaN guard puts the run back
    with pytest.raises(QuotaError, match="max_call_steps"):
        run.step_through(10**6, scale=0.5)
    assert (run.paused, run.step) == (True, 2) and torch.equal(run.activation(), before)
    done = client.generate(PROMPT, max_new_tokens=2)
    with pytest.raises(RunStateError):
        done.step_through(1, scale=0.5)
    run.close()
    done.close()
