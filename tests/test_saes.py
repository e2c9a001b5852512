"""Sparse autoencoders on the server: features read exactly as the formula (and SAELens, where
installed) encode; a feature condition pauses where a hook says it holds; a clamp fork equals a
hook doing the same replacement; bad input is a named error with nothing changed; loading is
admitted against the bytes and count quotas.

Random GPT-2 and Llama models, random SAEs written in SAELens's format (cfg.json +
sae_weights.safetensors), CPU, float32.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import djinn_nb
from djinn_nb.core.architecture import find_anatomy
from djinn_nb.core.pause import Trace
from djinn_nb.core.reference import generate, hf_model
from djinn_nb.errors import DjinnError, QuotaError, SaeError

MODELS = ["gpt2-tiny", "llama-tiny"]
PROMPT = [5, 17, 42, 99, 3, 250, 11]
N = 6
LAYER = 3
D_SAE = 96


def write_sae(path, d_in, hook, arch="standard", seed=0, k=None, apply_b_dec=True, rescale=False, legacy=False,
              d_sae=D_SAE):
    """A random SAE saved as SAELens 6 saves one (``legacy``: a pre-6 cfg, hook at top level);
    returns its tensors and config (the reference's inputs)."""
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.5, "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.2,
         "b_enc": torch.randn(d_sae, generator=g) * 0.2, "b_dec": torch.randn(d_in, generator=g) * 0.1}
    if arch == "jumprelu":
        t["threshold"] = torch.rand(d_sae, generator=g)
    cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": apply_b_dec,
           "normalize_activations": "none", "reshape_activations": "hook_z" if "hook_z" in hook else "none",
           "architecture": arch}
    if legacy:
        cfg.update(hook_name=hook, hook_layer=int(hook.split(".")[1]))
        del cfg["reshape_activations"]
    else:
        cfg["metadata"] = {"sae_lens_version": "6.54.12", "hook_name": hook}
    if arch == "topk":
        cfg.update(k=k or 5, rescale_acts_by_decoder_norm=rescale)
    os.makedirs(path, exist_ok=True)
    save_file(t, os.path.join(path, "sae_weights.safetensors"))
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    return t, cfg


def ref_encode(x, t, cfg):
    """SAELens's encode, written out: f = act(pre), pre = (x - b_dec*apply_b_dec_to_input) @ W_enc + b_enc."""
    x = x.float()
    if cfg.get("reshape_activations", "hook_z" if "hook_z" in cfg.get("hook_name", "") else "none") == "hook_z":
        x = x.flatten(-2)
    pre = (x - t["b_dec"] * cfg["apply_b_dec_to_input"]) @ t["W_enc"] + t["b_enc"]
    if cfg["architecture"] == "standard":
        return pre.relu()
    if cfg["architecture"] == "jumprelu":
        return pre.relu() * (pre > t["threshold"]).to(pre.dtype)
    if cfg.get("rescale_acts_by_decoder_norm"):
        pre = pre * t["W_dec"].norm(dim=-1)
    values, idx = torch.topk(pre, k=cfg["k"], dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, idx, values.relu())


def ref_decode(f, t, cfg):
    if cfg["architecture"] == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        f = f * (1 / t["W_dec"].norm(dim=-1))
    return f @ t["W_dec"] + t["b_dec"]


def ref_clamp(h, t, cfg, clamp, positions=None):
    """The hook's replacement: features set, error term kept: h + (decode(f') - decode(f))."""
    f = ref_encode(h, t, cfg)
    g = f.clone()
    rows = slice(None) if positions is None else torch.tensor(positions)
    for n, v in clamp.items():
        g[:, rows, n] = v
    return h + (ref_decode(g, t, cfg) - ref_decode(f, t, cfg))


@pytest.fixture(scope="module", params=MODELS)
def model(request, saved_models):
    return request.param, saved_models[request.param]


@pytest.fixture(scope="module")
def client(model):
    return djinn_nb.connect(model=model[1], device="cpu")


@pytest.fixture()
def fresh(client):
    """The client with no SAE and no run left over from another test."""
    yield client
    for r in client.runs():
        client.attach(r["id"]).close()
    for s in client.saes():
        client.unload_sae(s)


def hidden(client):
    return client.info["hidden_size"]


def paused_activations(client, sae, site="resid_pre"):
    """(step, activation, run.features(all ids)) at each step's pause at (LAYER, site)."""
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, "all", site)])
    out = []
    while run.paused:
        act = run.activation()
        out.append((run.step, act, run.features(sae, ids=list(range(D_SAE))), run.features(sae, k=7)))
        run.resume()
    run.close()
    return out


CASES = [dict(arch="standard"), dict(arch="standard", apply_b_dec=False), dict(arch="standard", legacy=True),
         dict(arch="jumprelu"), dict(arch="topk", k=5), dict(arch="topk", k=9, rescale=True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_features_equal_the_reference_encode_exactly(fresh, tmp_path, case):
    t, cfg = write_sae(tmp_path / "sae", hidden(fresh), f"blocks.{LAYER}.hook_resid_pre", seed=1, **case)
    sae = fresh.load_sae(str(tmp_path / "sae"))
    assert (sae.layer, sae.site, sae.d_in, sae.d_sae, sae.architecture) == (LAYER, "resid_pre", hidden(fresh), D_SAE,
                                                                           case["arch"])
    seen = paused_activations(fresh, sae)
    assert [s for s, *_ in seen] == list(range(N))
    active = 0
    for step, act, every, top in seen:
        ref = ref_encode(act, t, cfg)[0]
        assert torch.tensor([[a for _, a in row] for row in every]).equal(ref), step  # every feature, bit for bit
        values, ids = torch.topk(ref, 7, dim=-1)
        assert [[f for f, _ in row] for row in top] == ids.tolist()
        assert [[a for _, a in row] for row in top] == values.tolist()
        assert len(top) == act.shape[1] and top.token_ids == (PROMPT if step == 0 else top.token_ids)
        active += int((ref > 0).sum())
    assert active > 0  # the SAE reads something: a zero table would match a broken encode too


def test_features_at_site_z_flatten_the_heads(fresh, tmp_path):
    t, cfg = write_sae(tmp_path / "z", hidden(fresh), f"blocks.{LAYER}.attn.hook_z", seed=2)
    sae = fresh.load_sae(str(tmp_path / "z"))
    assert sae.site == "z"
    for step, act, every, _ in paused_activations(fresh, sae, "z"):
        assert act.dim() == 4
        assert torch.tensor([[a for _, a in row] for row in every]).equal(ref_encode(act, t, cfg)[0]), step


@pytest.mark.skipif(importlib.util.find_spec("sae_lens") is None,
                    reason="sae-lens is not installed (pip install 'djinn_nb[sae]'); the reference formula is tested")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_features_equal_saelens_encode_exactly(fresh, tmp_path, case):
    from sae_lens import SAE

    write_sae(tmp_path / "sae", hidden(fresh), f"blocks.{LAYER}.hook_resid_pre", seed=4, **case)
    theirs = SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    sae = fresh.load_sae(str(tmp_path / "sae"))
    for step, act, every, _ in paused_activations(fresh, sae):
        with torch.no_grad():
            expected = theirs.encode(act)[0]
        assert torch.tensor([[a for _, a in row] for row in every]).equal(expected), step


def reference_feature_maxima(path, t, cfg, feature):
    """Per step, the largest activation of ``feature`` over the step's positions at block LAYER's
    output, read by a forward hook on plain HF greedy generation."""
    model = hf_model(path)
    seen = []

    def record(h):
        seen.append(float(ref_encode(h, t, cfg)[..., feature].amax()))
        return h

    with Trace(find_anatomy(model).blocks[LAYER], edit=record):
        tokens = generate(model, PROMPT, N)
    return seen, tokens


def test_a_feature_condition_pauses_exactly_where_a_hook_says_it_holds(fresh, model, tmp_path):
    t, cfg = write_sae(tmp_path / "sae", hidden(fresh), f"blocks.{LAYER}.hook_resid_post", seed=5)
    sae = fresh.load_sae(str(tmp_path / "sae"), id="res3")
    feature = int(torch.stack([ref_encode(torch.randn(8, hidden(fresh)), t, cfg)]).sum((0, 1)).argmax())
    maxima, tokens = reference_feature_maxima(model[1], t, cfg, feature)
    assert len(maxima) == N
    threshold = sorted(maxima)[N // 2]  # some steps above, some not
    expected = [s for s, m in enumerate(maxima) if m > threshold]
    assert 0 < len(expected) < N
    run = fresh.generate(PROMPT, max_new_tokens=N,
                         breakpoints=[{"layer": LAYER, "step": "all", "when": f"feature(res3, {feature}) > {threshold!r}"}])
    paused = []
    while run.paused:
        paused.append(run.step)
        assert max(a for row in run.features(sae, ids=[feature]) for _, a in row) == maxima[run.step]
        run.resume()
    assert paused == expected and run.token_ids == tokens
    assert run.breakpoints[0]["when"] == {"term": "feature", "sae": "res3", "feature": feature, "op": ">",
                                          "value": threshold}


@pytest.fixture()
def clamp_setup(fresh, model, tmp_path):
    t, cfg = write_sae(tmp_path / "sae", hidden(fresh), f"blocks.{LAYER}.hook_resid_post", seed=6)
    sae = fresh.load_sae(str(tmp_path / "sae"))
    baseline = generate(hf_model(model[1]), PROMPT, N)
    return fresh, model[1], sae, t, cfg, baseline


def test_a_clamp_fork_equals_a_hook_doing_the_same_replacement(clamp_setup):
    client, path, sae, t, cfg, baseline = clamp_setup
    for step in (0, 2):
        run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, step)])
        h = run.activation()
        top = int(ref_encode(h, t, cfg)[0, -1].argmax())
        for clamp, positions in (({top: 0.0, 1: 40.0}, None), ({top: 40.0}, [0] if step else [2, 4])):
            edit = lambda x, c=clamp, p=positions: ref_clamp(x, t, cfg, c, p)  # noqa: E731
            expected = generate(hf_model(path), PROMPT, N, edit_layer=LAYER, edit_call=step, edit=edit)
            fork = run.fork(clamp=clamp, sae=sae, positions=positions, breakpoints=[])
            assert fork.token_ids == expected, (step, clamp, positions)
            assert fork.token_ids != baseline, "the clamp changes nothing: the check could not fail"
            fork.close()
        forks = run.fork_many([{"clamp": {top: v}, "sae": sae.id, "breakpoints": []} for v in (30.0, 60.0)])
        for fork, v in zip(forks, (30.0, 60.0)):
            edit = lambda x, c={top: v}: ref_clamp(x, t, cfg, c)  # noqa: E731
            assert fork.token_ids == generate(hf_model(path), PROMPT, N, edit_layer=LAYER, edit_call=step, edit=edit)
        assert run.activation().equal(h)  # the parent is as it was
        run.resume(clamp={top: 50.0}, sae=sae)
        edit = lambda x, c={top: 50.0}: ref_clamp(x, t, cfg, c)  # noqa: E731
        assert run.token_ids == generate(hf_model(path), PROMPT, N, edit_layer=LAYER, edit_call=step, edit=edit)


def test_a_clamp_to_the_features_own_values_leaves_the_activation_as_it_was(clamp_setup):
    client, _, sae, t, cfg, baseline = clamp_setup
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[LAYER])
    f = ref_encode(run.activation(), t, cfg)[0]
    same = {n: float(f[-1, n]) for n in range(4)}
    assert run.fork(clamp=same, sae=sae, positions=[len(PROMPT) - 1], breakpoints=[]).token_ids == baseline


def test_bad_input_is_a_named_error_and_changes_nothing(fresh, tmp_path):
    client = fresh
    d = hidden(client)
    write_sae(tmp_path / "ok", d, f"blocks.{LAYER}.hook_resid_post", seed=7)
    write_sae(tmp_path / "wide", d + 1, f"blocks.{LAYER}.hook_resid_post")
    sae = client.load_sae(str(tmp_path / "ok"), id="ok")
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[LAYER, (LAYER + 1, 0)])
    at = {"where": (LAYER, 0), "activation": run.activation()}
    runs_before = [r["id"] for r in client.runs()]

    def refused(fn, *words):
        with pytest.raises(SaeError) as e:
            fn()
        for w in words:
            assert w in str(e.value), (w, str(e.value))
        assert [s.id for s in client.saes()] == ["ok"]
        assert [r["id"] for r in client.runs()] == runs_before
        assert run.refresh().paused and (run.layer, run.step) == at["where"]
        assert run.activation().equal(at["activation"])

    refused(lambda: client.load_sae(str(tmp_path / "wide")), f"d_in={d + 1}", f"has {d}")
    refused(lambda: client.load_sae(str(tmp_path / "missing")), "not a readable directory")
    refused(lambda: client.load_sae(str(tmp_path / "ok" / "cfg.json")), "not a readable directory")
    refused(lambda: client.load_sae(str(tmp_path / "ok"), site="blocks.99.hook_resid_pre"), "out of range")
    refused(lambda: client.load_sae(str(tmp_path / "ok"), id="ok"), "already have")
    refused(lambda: client.load_sae(str(tmp_path / "ok"), id="1 bad"), "SAE id")
    refused(lambda: run.features(sae, ids=[D_SAE]), f"0..{D_SAE - 1}")
    refused(lambda: run.features(sae, k=0), "k must be")
    refused(lambda: run.features("nope"), "no SAE 'nope'", "ok")
    refused(lambda: run.fork(clamp={D_SAE: 0.0}, sae=sae), f"feature {D_SAE}")
    refused(lambda: run.fork(clamp={1: 0.0}), "pass sae=")
    refused(lambda: run.fork(clamp={1: 0.0}, sae="nope"), "no SAE 'nope'")
    refused(lambda: run.fork(clamp={1: float("nan")}, sae=sae), "finite")
    refused(lambda: run.resume(clamp={1: 0.0}, sae="nope"), "no SAE")
    refused(lambda: run.fork_many([{"clamp": {1: 0.0}, "sae": sae}, {"clamp": {D_SAE: 0.0}, "sae": sae}]), "feature")
    with pytest.raises(DjinnError, match="positions"):
        run.fork(clamp={1: 0.0}, sae=sae, positions=[len(PROMPT)])
    for when, words in ((f"feature(ok, {D_SAE}) > 1", [f"feature {D_SAE}"]), ("feature(nope, 1) > 1", ["no SAE"]),
                        ("feature(ok, 1) > 1", ["layer 3 resid_post", f"layer {LAYER + 1}"])):
        layer = LAYER + 1 if "ok, 1)" in when else LAYER
        bps = [{"layer": layer, "when": when}]
        refused(lambda b=bps: client.generate(PROMPT, max_new_tokens=N, breakpoints=b), *words)
        refused(lambda b=bps: run.fork(breakpoints=b), *words)
    run.resume()  # to layer LAYER + 1: an SAE of layer LAYER does not read there
    at.update(where=(LAYER + 1, 0), activation=run.activation())
    refused(lambda: run.features(sae), f"layer {LAYER} resid_post", f"layer {LAYER + 1}")
    with pytest.raises(SaeError, match=f"layer {LAYER + 1}"):
        run.fork(clamp={1: 0.0}, sae=sae)


def test_file_contents_never_appear_in_an_error(fresh, tmp_path):
    secret = "TOP-SECRET-7731"
    d = tmp_path / "notsae"
    d.mkdir()
    (d / "cfg.json").write_text(f'{{"d_in": "{secret}"}}')
    (d / "sae_weights.safetensors").write_text(secret * 10)
    for cfg in (f"not json {secret}", f'{{"d_in": "{secret}"}}', f'{{"d_in": 64, "d_sae": 8, "architecture": "{secret}"}}'):
        (d / "cfg.json").write_text(cfg)
        with pytest.raises(SaeError) as e:
            fresh.load_sae(str(d))
        assert secret not in str(e.value)
    write_sae(tmp_path / "ok", hidden(fresh), f"blocks.{LAYER}.hook_resid_post")
    (d / "cfg.json").write_text((tmp_path / "ok" / "cfg.json").read_text())
    with pytest.raises(SaeError) as e:
        fresh.load_sae(str(d))  # weights not safetensors
    assert secret not in str(e.value) and "safetensors" in str(e.value)
    assert fresh.saes() == []


def test_unloading_is_refused_while_a_condition_reads_the_sae(fresh, tmp_path):
    write_sae(tmp_path / "s", hidden(fresh), f"blocks.{LAYER}.hook_resid_post")
    sae = fresh.load_sae(str(tmp_path / "s"))
    run = fresh.generate(PROMPT, max_new_tokens=N, breakpoints=[{"layer": LAYER, "step": "all",
                                                                   "when": f"feature({sae.id}, 0) >= 0"}])
    with pytest.raises(SaeError, match=f"run {run.id}"):
        fresh.unload_sae(sae)
    run.close()
    fresh.unload_sae(sae)
    assert fresh.saes() == []


def test_loading_is_admitted_against_the_byte_and_count_quotas(tmp_path):
    from djinn_nb.serving.limits import Limits
    from serving import serve

    write_sae(tmp_path / "s", 64, f"blocks.{LAYER}.hook_resid_post")
    nbytes = (2 * 64 * D_SAE + 64 + D_SAE) * 4
    served = serve(limits=Limits(user_max_saes=2, user_max_held_bytes=nbytes * 2 - 1))
    try:
        client = djinn_nb.connect(f"127.0.0.1:{served.port}")
        first = client.load_sae(str(tmp_path / "s"))
        assert first.bytes == nbytes and served.engine.stepper.saes.held_bytes() == nbytes
        with pytest.raises(QuotaError, match="user_max_held_bytes"):
            client.load_sae(str(tmp_path / "s"))
        assert [s.id for s in client.saes()] == [first.id] and served.engine.stepper.saes.held_bytes() == nbytes
        served.server.state.limits.user_max_held_bytes = None
        client.load_sae(str(tmp_path / "s"))
        with pytest.raises(QuotaError, match="user_max_saes"):
            client.load_sae(str(tmp_path / "s"))
        assert len(client.saes()) == 2
        client.close()
    finally:
        served.server.close()


def test_a_server_with_sae_dirs_loads_only_from_under_them(tmp_path):
    from djinn_nb.serving.limits import Limits
    from serving import serve

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    write_sae(allowed / "a", 64, f"blocks.{LAYER}.hook_resid_post")
    write_sae(outside / "b", 64, f"blocks.{LAYER}.hook_resid_post")
    (allowed / "link").symlink_to(outside / "b")
    served = serve(limits=Limits(sae_dirs=(str(allowed),)))
    try:
        client = djinn_nb.connect(f"127.0.0.1:{served.port}")
        assert client.load_sae(str(allowed / "a")).d_in == 64
        for path in (outside / "b", allowed / "link", allowed / ".." / "outside" / "b", outside / "missing"):
            with pytest.raises(SaeError, match="only from its SAE directories"):
                client.load_sae(str(path))
        assert len(client.saes()) == 1
        client.close()
    finally:
        served.server.close()


@pytest.mark.attack(cls="defaults", tried="load_sae of paths on a shared server started without --sae-dir (probing its disk)",
                    held="refused before the path is looked at; one user on loopback may load from anywhere")
def test_a_shared_server_loads_saes_only_from_directories_its_admin_names(tmp_path):
    import argparse

    from djinn_nb.serving.cli import _sae_dirs
    from djinn_nb.serving.limits import Limits
    from serving import serve

    def dirs(host="127.0.0.1", users=None, sae_dir=None):
        return _sae_dirs(argparse.Namespace(host=host, users=users, sae_dir=sae_dir))

    assert dirs() is None  # one user on loopback: their own machine's disk
    assert dirs(users="users.yaml") == () and dirs(host="0.0.0.0") == ()
    assert dirs(users="users.yaml", sae_dir=["/srv/saes"]) == ("/srv/saes",)
    write_sae(tmp_path / "a", 64, f"blocks.{LAYER}.hook_resid_post")
    served = serve(limits=Limits(sae_dirs=()))
    try:
        client = djinn_nb.connect(f"127.0.0.1:{served.port}")
        for path in (tmp_path / "a", tmp_path / "missing", "/etc"):
            with pytest.raises(SaeError, match=r"only from directories its admin names \(djinn-server --sae-dir DIR\)"):
                client.load_sae(str(path))
        assert client.saes() == []
        client.close()
    finally:
        served.server.close()


@pytest.mark.attack(cls="admission", tried="an SAE file swapped for a larger one between the header check and the load; "
                    "cfg/weights files that are links out of --sae-dir",
                    held="refused before the tensors are read; links refused; nothing loaded")
def test_a_swapped_or_linked_sae_file_is_refused_before_its_tensors_are_read(tmp_path, monkeypatch):
    from djinn_nb.core import saes
    from djinn_nb.serving.limits import Limits
    from serving import serve

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    write_sae(allowed / "a", 64, f"blocks.{LAYER}.hook_resid_post")
    write_sae(outside / "big", 64, f"blocks.{LAYER}.hook_resid_post", d_sae=4 * D_SAE)
    (allowed / "linked").mkdir()
    for name in ("cfg.json", "sae_weights.safetensors"):
        (allowed / "linked" / name).symlink_to(outside / "big" / name)
    served = serve(limits=Limits(sae_dirs=(str(allowed),)))
    try:
        client = djinn_nb.connect(f"127.0.0.1:{served.port}")
        with pytest.raises(SaeError, match="must be files, not links"):
            client.load_sae(str(allowed / "linked"))
        real = saes.inspect_dir

        def swap_after_check(path, roots=None):
            files = real(path, roots)  # admitted on this header; then the file changes
            os.replace(outside / "big" / "sae_weights.safetensors", allowed / "a" / "sae_weights.safetensors")
            return files

        monkeypatch.setattr(saes, "inspect_dir", swap_after_check)
        monkeypatch.setattr("djinn_nb.serving.sae_calls.inspect_dir", swap_after_check, raising=False)
        with pytest.raises(SaeError, match="changed while it was loaded; nothing was loaded"):
            client.load_sae(str(allowed / "a"))
        assert client.saes() == []
        client.close()
    finally:
        served.server.close()


@pytest.mark.attack(cls="admission", tried="features, clamps and feature conditions of a large SAE over many positions "
                    "(positions x d_sae tensors on the way, never counted)",
                    held="admitted on their working bytes before encoding: refused over the quota, nothing changed")
def test_encoding_an_saes_features_is_admitted_on_its_working_bytes(tmp_path):
    from djinn_nb.serving.limits import Limits
    from serving import serve

    d_sae = 8192
    write_sae(tmp_path / "wide", 64, f"blocks.{LAYER}.hook_resid_post", d_sae=d_sae)
    served = serve(limits=Limits())
    try:
        client = djinn_nb.connect(f"127.0.0.1:{served.port}")
        sae = client.load_sae(str(tmp_path / "wide"))
        prompt = [i % 500 for i in range(200)]
        run = client.generate(prompt, max_new_tokens=2, breakpoints=[(LAYER, 0)])
        work = 4 * len(prompt) * d_sae * 4  # 26 MB for 200 positions of an 8,192-feature SAE in fp32
        served.server.state.limits.max_held_bytes = sae.bytes + run.refresh().bytes_held + work // 2
        before = run.activation()
        with pytest.raises(QuotaError, match="max_held_bytes"):
            run.features(sae, k=5)
        with pytest.raises(QuotaError, match="max_held_bytes"):
            run.fork(clamp={3: 0.0}, sae=sae)
        with pytest.raises(QuotaError, match="max_held_bytes"):
            client.generate(prompt, max_new_tokens=2, breakpoints=[
                {"layer": LAYER, "step": "all", "when": f"feature({sae.id}, 3) > 1"}])
        assert torch.equal(run.activation(), before) and len(client.runs()) == 1
        served.server.state.limits.max_held_bytes = None
        assert len(run.features(sae, k=5)) == len(prompt)  # with room, it is served
        client.close()
    finally:
        served.server.close()
