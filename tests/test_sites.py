"""Breakpoints at every site of a block, per-head edits, the logit lens and the attention pattern,
each against plain HF plus a torch hook on the sub-module that site names."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import djinn_nb
from djinn_nb.core.reference import generate, hf_model
from djinn_nb.errors import ActivationError, BadRequestError, BreakpointError

PROMPT = [5, 17, 42, 99, 3, 250, 11, 7]
N = 8
LAYER = 1
SITES = ["resid_pre", "z", "attn_out", "resid_mid", "mlp_out", "resid_post"]
#: (attribute path under the block, hook on its input?) — written out here, not taken from djinn_nb
MODULES = {
    "gpt2-tiny": {"resid_pre": ("", True), "z": ("attn.c_proj", True), "attn_out": ("attn", False),
                  "mlp_out": ("mlp", False), "resid_post": ("", False)},
    "llama-tiny": {"resid_pre": ("", True), "z": ("self_attn.o_proj", True), "attn_out": ("self_attn", False),
                   "mlp_out": ("mlp", False), "resid_post": ("", False)},
}
BLOCKS = {"gpt2-tiny": "transformer.h", "llama-tiny": "model.layers"}


def module_at(shape: str, site: str):
    path, pre = MODULES[shape][site]

    def resolve(model, layer):
        module = model.get_submodule(BLOCKS[shape])[layer]
        return (module.get_submodule(path) if path else module), pre

    return resolve


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def setup(request, saved_models):
    path = saved_models[request.param]
    return request.param, djinn_nb.connect(model=path, device="cpu"), hf_model(path), path


def walk(run):
    seen = []
    while run.paused:
        seen.append((run.layer, run.site, run.step, run.activation()))
        run.resume()
    return seen


@pytest.mark.parametrize("step", [0, 3])
def test_pausing_at_every_site_in_forward_order_resumes_to_plain_tokens(setup, step):
    shape, client, model, _ = setup
    bps = [(LAYER, step, s) for s in reversed(SITES)] + [{"layer": LAYER + 1, "step": step, "site": "z"}]
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=bps)
    seen = walk(run)
    assert [(layer, site) for layer, site, _, _ in seen] == [(LAYER, s) for s in SITES] + [(LAYER + 1, "z")]
    assert run.token_ids == generate(model, PROMPT, N)
    acts = {site: a for _, site, _, a in seen}
    assert torch.equal(acts["resid_mid"], acts["resid_pre"] + acts["attn_out"])
    assert torch.equal(acts["resid_post"], acts["resid_mid"] + acts["mlp_out"])
    heads = client.info["num_heads"]
    assert acts["z"].shape == (1, len(PROMPT) if step == 0 else 1, heads, client.info["hidden_size"] // heads)


@pytest.mark.parametrize("site", ["resid_pre", "z", "attn_out", "mlp_out", "resid_post"])
@pytest.mark.parametrize("step", [0, 2])
def test_scaling_each_site_matches_a_hook_on_its_module(setup, site, step):
    shape, client, model, _ = setup
    ref = generate(model, PROMPT, N, edit_layer=LAYER, edit_call=step, edit=lambda h: h * -2.0,
                   module_of=module_at(shape, site))
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, step, site)], record_logits=True)
    assert (run.site, run.layer, run.step) == (site, LAYER, step)
    fork = run.fork(scale=-2.0, breakpoints=[])
    assert fork.token_ids == ref
    plain = client.generate(PROMPT, max_new_tokens=N, record_logits=True)
    assert not torch.equal(fork.logits(step), plain.logits(step))  # the edit took effect
    assert run.paused and run.resume(scale=-2.0).token_ids == ref


@pytest.mark.parametrize("step", [0, 2])
def test_head_ablation_at_z_equals_zeroing_that_slice_at_the_output_projection(setup, step):
    shape, client, model, _ = setup
    heads = client.info["num_heads"]
    head_dim = client.info["hidden_size"] // heads

    def zero_head_1(x):
        x = x.clone()
        x[..., 1 * head_dim:2 * head_dim] = 0.0
        return x

    ref = generate(model, PROMPT, N, edit_layer=LAYER, edit_call=step, edit=zero_head_1, module_of=module_at(shape, "z"))
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, step, "z")])
    ablated = run.fork(heads=[1], scale=0.0, breakpoints=[])
    assert ablated.token_ids == ref
    edited = run.edit(heads=[1], scale=0.0).activation()
    assert torch.count_nonzero(edited[..., 1, :]) == 0
    assert torch.equal(edited[..., 0, :], run.activation(original=True)[..., 0, :])


def test_lens_equals_the_head_by_hand_and_the_models_own_top_k_at_the_last_layer(setup):
    shape, client, model, _ = setup
    last = client.info["num_layers"] - 1
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, 0, "resid_mid"), (last, 2)])
    h = run.activation()[0]
    norm = model.transformer.ln_f if shape == "gpt2-tiny" else model.model.norm
    with torch.no_grad():
        by_hand = torch.softmax(model.lm_head(norm(h)).float(), -1).topk(5)
    lens = run.lens(k=5)
    assert [[i for i, _ in row] for row in lens] == by_hand.indices.tolist()
    assert torch.allclose(torch.tensor([[p for _, p in row] for row in lens]), by_hand.values, atol=1e-5)
    run.resume()
    assert (run.layer, run.step) == (last, 2)
    with torch.no_grad():
        own = torch.softmax(model(torch.tensor([PROMPT + run.token_ids])).logits[0, -1].float(), -1).topk(3)
    top = run.lens(k=3)[-1]
    assert [i for i, _ in top] == own.indices.tolist()
    assert max(abs(p - q) for (_, p), q in zip(top, own.values.tolist())) < 1e-5
    grid = client.lens_grid(PROMPT, k=1)
    assert grid["ids"].shape == (client.info["num_layers"], len(PROMPT), 1)
    with torch.no_grad():
        hidden = model(torch.tensor([PROMPT]), output_hidden_states=True).hidden_states
    assert grid["ids"][LAYER, :, 0].tolist() == torch.softmax(
        model.lm_head(norm(hidden[LAYER + 1][0])).float(), -1).argmax(-1).tolist()


@pytest.mark.parametrize("step,site", [(0, "resid_post"), (0, "resid_pre"), (3, "z"), (3, "mlp_out")])
def test_attention_equals_eager_output_attentions(setup, step, site):
    shape, client, _, path = setup
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, step, site)])
    got = run.attention()
    seq = PROMPT + run.token_ids[:step]
    with torch.no_grad():
        ref = eager(torch.tensor([seq]), output_attentions=True).attentions[LAYER]
    ref = ref[:, :, -(len(PROMPT) if step == 0 else 1):, :]
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5)
    assert run.resume().paused is False and run.token_ids == generate(hf_model(path), PROMPT, N)


def test_bad_sites_and_heads_are_refused_and_change_nothing(setup, saved_models):
    shape, client, _, _ = setup
    with pytest.raises(BreakpointError, match="unknown site 'mlp'"):
        client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, 0, "mlp")])
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, 0, "attn_out")])
    before = run.activation()
    with pytest.raises(ActivationError, match="heads= applies at site 'z'"):
        run.fork(heads=[0], scale=0.0)
    with pytest.raises(BadRequestError, match="the logit lens reads the residual stream"):
        run.lens()
    assert run.refresh().paused and (run.layer, run.site) == (LAYER, "attn_out")
    assert torch.equal(run.activation(), before)
    z = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, 0, "z")])
    with pytest.raises(ActivationError, match="heads must be distinct integers in 0..3"):
        z.fork(heads=[9], scale=0.0)
    neox = djinn_nb.connect(model=saved_models["neox-tiny"])
    with pytest.raises(BreakpointError, match="use_parallel_residual"):
        neox.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, 0, "resid_mid")])


def test_neox_sites_are_exact_too(saved_models):
    path = saved_models["neox-tiny"]
    client = djinn_nb.connect(model=path)
    sites = [s for s in SITES if s != "resid_mid"]
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, 2, s) for s in sites])
    seen = walk(run)
    assert [s for _, s, _, _ in seen] == sites and run.token_ids == generate(hf_model(path), PROMPT, N)


def test_embedded_smollm2_sites_are_exact(embedded):
    """The embedded default (Llama family, real weights): every site of one block, and an edit at mlp_out."""
    client = djinn_nb.connect()
    ids = embedded.tokenizer("The capital of France is")["input_ids"]
    layer = 6
    run = client.generate(ids, max_new_tokens=6, breakpoints=[(layer, 2, s) for s in SITES])
    assert [s for _, s, _, _ in walk(run)] == SITES
    assert run.token_ids == generate(embedded.model, ids, 6)
    mlp = embedded.model.model.layers[layer].mlp
    ref = generate(embedded.model, ids, 6, edit_layer=layer, edit_call=0, edit=lambda h: h * 4.0,
                   module_of=lambda model, i: (mlp, False))
    paused = client.generate(ids, max_new_tokens=6, breakpoints=[(layer, 0, "mlp_out")])
    assert paused.fork(scale=4.0, breakpoints=[]).token_ids == ref
