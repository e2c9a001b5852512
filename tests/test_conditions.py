"""Conditions on a token's text: resolved to ids with the model's tokenizer when the breakpoint is set,
pausing at exactly the steps the id form pauses at (embedded SmolLM2 and a random Llama with a tokenizer)."""
from __future__ import annotations

import json

import pytest
import torch

import djinn_nb
from djinn_nb.conditions import evaluate, has_texts, parse, resolve_texts, to_text
from djinn_nb.errors import BreakpointError, NoTokenizerError

N = 12
LAYER = 1


def quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# ----- the language ---------------------------------------------------------------

def test_a_text_parses_as_text_and_resolves_to_its_one_token():
    tree = parse('token == " Paris" or token in [" a", 7]')
    assert has_texts(tree)
    resolved = resolve_texts(tree, {" Paris": [7042], " a": [257]}.__getitem__)
    assert not has_texts(resolved)
    assert resolved == {"or": [{"term": "token", "op": "==", "value": {"text": " Paris", "id": 7042}},
                               {"term": "token", "op": "in", "values": [{"text": " a", "id": 257}, 7]}]}
    assert evaluate(resolved, {"token": 7042}) and evaluate(resolved, {"token": 257})
    assert evaluate(resolved, {"token": 7}) and not evaluate(resolved, {"token": 8})
    assert to_text(resolved) == "token == ' Paris' or token in [' a', 7]"


@pytest.mark.parametrize("op", ["<", "<=", ">", ">="])
def test_ordering_a_text_is_an_error_when_parsed(op):
    with pytest.raises(BreakpointError, match="compares only with == != or in"):
        parse(f'token {op} " Paris"')


def test_a_text_of_several_tokens_or_none_names_its_tokens():
    with pytest.raises(BreakpointError, match=r"token ' Paris is' is 2 tokens \[7042, 318\]"):
        resolve_texts(parse('token == " Paris is"'), {" Paris is": [7042, 318]}.__getitem__)
    with pytest.raises(BreakpointError, match=r"token '' is 0 tokens"):
        resolve_texts(parse('token != ""'), lambda text: [])


def test_an_unresolved_text_never_silently_compares():
    with pytest.raises(BreakpointError, match="not resolved"):
        evaluate(parse('token == " Paris"'), {"token": 7042})


@pytest.mark.parametrize("source", ["step < 1e400", "token == " + "9" * 400])
def test_numbers_past_floats_range_are_refused_with_a_message(source):
    with pytest.raises(BreakpointError):
        parse(source)


# ----- on models ------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_with_tokenizer(tmp_path_factory, embedded):
    """A random Llama whose vocabulary is the embedded tokenizer's, saved with that tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(embedded.tokenizer), max_position_embeddings=256,
                      initializer_range=0.2)
    path = tmp_path_factory.mktemp("llama-tok")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    embedded.tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["embedded", "random"])
def client(request, random_with_tokenizer):
    return djinn_nb.connect(model=None if request.param == "embedded" else random_with_tokenizer, device="cpu")


def steps_paused(run):
    steps = []
    while run.paused:
        steps.append(run.step)
        run.resume()
    return steps


def one_token_text(client, tokens):
    """A generated token whose text tokenizes back to it alone (and its id)."""
    for t in tokens:
        text = client.decode([t])
        if text and "\\" not in text and client.tokenize(text) == [t]:
            return text, t
    pytest.skip("no generated token round-trips through the tokenizer alone")


def test_text_and_id_forms_pause_at_exactly_the_same_steps(client):
    prompt = "The capital of France is"
    tokens = client.generate(prompt, max_new_tokens=N).token_ids
    text, tid = one_token_text(client, tokens)
    expected = [s for s, t in enumerate(tokens) if t == tid]
    for when in (f"token == {tid}", f"token == {quoted(text)}", f"token in [{quoted(text)}, -1]"):
        run = client.generate(prompt, max_new_tokens=N, breakpoints=[{"layer": LAYER, "step": "all", "when": when}])
        assert steps_paused(run) == expected, when
        assert run.token_ids == tokens
        run.close()
    others = [s for s, t in enumerate(tokens) if t != tid]
    run = client.generate(prompt, max_new_tokens=N,
                          breakpoints=[{"layer": LAYER, "step": "all", "when": f"token != {quoted(text)}"}])
    assert steps_paused(run) == others
    run.close()


def test_the_breakpoint_lists_the_text_with_its_id(client):
    tid = client.tokenize(" Paris")
    if len(tid) != 1:
        pytest.skip("' Paris' is not one token here")
    run = client.generate("Hello", max_new_tokens=2,
                          breakpoints=[{"layer": LAYER, "step": "all", "when": 'token == " Paris"'}])
    assert run.breakpoints[0]["when"] == {"term": "token", "op": "==", "value": {"text": " Paris", "id": tid[0]}}
    run.close()


def test_a_text_of_two_tokens_is_refused_when_set_and_no_run_is_made(client):
    text = " Paris is"
    ids = client.tokenize(text)
    assert len(ids) == 2
    count = len(client.runs())
    with pytest.raises(BreakpointError, match=rf"token ' Paris is' is 2 tokens \[{ids[0]}, {ids[1]}\]"):
        client.generate("Hello", max_new_tokens=2,
                        breakpoints=[{"layer": LAYER, "step": "all", "when": f"token == {quoted(text)}"}])
    assert len(client.runs()) == count


def test_ordering_a_text_fails_before_the_run_not_during_it(client):
    count = len(client.runs())
    with pytest.raises(BreakpointError, match="texts have no order"):
        client.generate("Hello", max_new_tokens=2,
                        breakpoints=[{"layer": LAYER, "step": "all", "when": 'token < " Paris"'}])
    assert len(client.runs()) == count


def test_a_model_without_a_tokenizer_says_so(saved_models):
    client = djinn_nb.connect(model=saved_models["gpt2-tiny"], device="cpu")
    with pytest.raises(NoTokenizerError, match="no tokenizer: compare token with token ids"):
        client.generate([1, 2, 3], max_new_tokens=2,
                        breakpoints=[{"layer": LAYER, "step": "all", "when": 'token == " Paris"'}])
    run = client.generate([1, 2, 3], max_new_tokens=2, breakpoints=[{"layer": LAYER, "step": "all", "when": "token >= 0"}])
    assert run.paused and run.step == 0
    run.close()


@pytest.mark.attack(cls="fairness", tried="4,097 breakpoints, or conditions of more than 1,000 parts, on one run (150,000 made another user's fork wait 1.9 s)", held="refused when the run is asked for")
def test_a_runs_breakpoints_and_condition_parts_are_bounded():
    """Each breakpoint is looked at, and each condition part tested, at every step it covers: a run
    may not inflate the shared device's steps with thousands of them (150,000 never-true conditions
    made another user's one-token fork wait up to 1.9 s)."""
    from djinn_nb.core.specs import MAX_BREAKPOINTS, MAX_CONDITION_PARTS, parse_breakpoints
    from djinn_nb.errors import BreakpointError

    many = [{"layer": 0, "step": s} for s in range(MAX_BREAKPOINTS + 1)]
    with pytest.raises(BreakpointError, match=f"at most {MAX_BREAKPOINTS} breakpoints"):
        parse_breakpoints(many, 1, MAX_BREAKPOINTS + 2)
    assert len(parse_breakpoints(many[:-1], 1, MAX_BREAKPOINTS + 2)) == MAX_BREAKPOINTS
    cond = " or ".join(["norm > LIMIT"] * 10)  # an "or" of 10 comparisons: 11 parts
    fits = MAX_CONDITION_PARTS // 11
    bps = [{"layer": 0, "step": "all", "when": cond.replace("LIMIT", str(10**6 + i))} for i in range(fits + 1)]
    assert len(parse_breakpoints(bps[:fits], 1, 4)) == fits
    with pytest.raises(BreakpointError, match=f"at most {MAX_CONDITION_PARTS} parts in all"):
        parse_breakpoints(bps, 1, 4)
