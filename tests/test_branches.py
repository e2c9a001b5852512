"""``djinn_nb.diff``: two branches of one prompt compared on the server, against plain HF (CPU, fp32).

The divergence is the first step where a reference computed by HF ``generate`` with a torch hook
(the same edit) parts from plain greedy generation; distances equal those between HF's own hidden
states (``output_hidden_states``, the hook applied at the edited step's positions) to 1e-5; the KL
equals torch's ``kl_div`` of the two softmaxes of HF's logits. Bad requests are named errors that
change nothing; a diff is one request, and admitted on its estimate before it allocates.
"""
from __future__ import annotations

import pytest
import torch

import djinn_nb
from djinn_nb.core.reference import edit_at, generate, hf_model, scale
from djinn_nb.errors import BadRequestError, BreakpointError, DjinnError, QuotaError, UnknownRunError
from experiments.harness.round_trips import count_requests

PROMPT = [5, 17, 42, 99, 3, 250, 11, 7]
N = 8
LAYER, STEP, FACTOR = 3, 3, 4.0


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def setup(request, saved_models):
    path = saved_models[request.param]
    client = djinn_nb.connect(model=path, device="cpu")
    yield client, hf_model(path)
    client.close()


def reference_states(model, prompt, tokens, edit_step=None, layer=LAYER, factor=FACTOR):
    """Per layer (layers, positions, hidden) block outputs and (positions, vocab) logits of one HF
    forward over ``prompt + tokens[:-1]`` (every step's input), with block ``layer``'s output scaled
    at ``edit_step``'s positions when given: hidden states from ``output_hidden_states`` (the last
    block's from a hook: HF gives the final norm's output there)."""
    ids = torch.tensor([list(prompt) + list(tokens[:-1])])
    p = len(prompt)
    where = list(range(p)) if edit_step == 0 else [p + edit_step - 1] if edit_step is not None else []

    def edit(h):
        h = h.clone()
        h[:, where] = h[:, where] * factor
        return h

    last = []
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    hook = blocks[-1].register_forward_hook(lambda m, i, o: last.append((o[0] if isinstance(o, tuple) else o)[0]))
    try:
        with torch.no_grad():
            if edit_step is None:
                out = model(ids, output_hidden_states=True)
            else:
                with edit_at(model, layer, edit):
                    out = model(ids, output_hidden_states=True)
    finally:
        hook.remove()
    states = torch.stack([h[0] for h in out.hidden_states[1:-1]] + [last[0]])
    return states, out.logits[0]


def step_positions(s, p):
    return list(range(p)) if s == 0 else [p + s - 1]


def expected(model, a_tokens, b_tokens, b_edit_step=None, a_edit_step=None):
    """Reference distances [layer][step] and KL per step over the steps both branches finished."""
    sa, la = reference_states(model, PROMPT, a_tokens, a_edit_step)
    sb, lb = reference_states(model, PROMPT, b_tokens, b_edit_step)
    n = min(len(a_tokens), len(b_tokens))
    dist = [[(sa[layer, step_positions(s, len(PROMPT))] - sb[layer, step_positions(s, len(PROMPT))]).norm().item()
             for s in range(n)] for layer in range(sa.shape[0])]
    last = [len(PROMPT) + s - 1 for s in range(n)]
    kl = [torch.nn.functional.kl_div(lb[q].log_softmax(-1), la[q].log_softmax(-1), reduction="sum",
                                     log_target=True).item() for q in last]
    return dist, kl


def close(x, y, tol=1e-5):
    return abs(x - y) <= tol * max(1.0, abs(y))


def first_difference(x, y):
    return next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), None)


def test_a_run_with_itself_and_two_greedy_runs_of_one_prompt_do_not_diverge(setup):
    client, _ = setup
    a = client.generate(PROMPT, max_new_tokens=N)
    b = client.generate(PROMPT, max_new_tokens=N)
    for other in (a, b):
        d = djinn_nb.diff(a, other)
        assert d.divergence is None and d.topk is None and d.lens is None
        assert d.steps == list(range(N)) and len(d.layers) == client.info["num_layers"]
        assert all(x == 0.0 for row in d.distance for x in row), d.distance
        assert d.kl == [0.0] * N
        assert d.reply.unreproduced_a == d.reply.unreproduced_b == []
    a.close()
    b.close()


def test_a_rewound_fork_with_an_edit_against_hf_with_a_hook(setup):
    """The recomputed path: no watches. The edit step's cells from layer LAYER on cannot be
    recomputed (the run does not keep its edit): they are None, every other one equals HF's."""
    client, model = setup
    greedy = generate(model, PROMPT, N)
    hooked = generate(model, PROMPT, N, edit_layer=LAYER, edit_call=STEP, edit=scale(FACTOR))
    src = client.generate(PROMPT, max_new_tokens=N)
    fork = src.rewind(STEP, LAYER).fork(scale=FACTOR, breakpoints=[])
    assert src.token_ids == greedy and fork.token_ids == hooked
    before = [src.summary, fork.summary]
    with count_requests(client) as sent:
        d = djinn_nb.diff(src, fork)
    assert sent.n == 1, sent
    assert d.divergence == first_difference(greedy, hooked) is not None
    assert d.reply.unreproduced_a == [] and d.reply.unreproduced_b == [STEP]
    dist, kl = expected(model, greedy, hooked, b_edit_step=STEP)
    unknown = {(layer, s) for layer, row in enumerate(d.distance) for s, x in enumerate(row) if x is None}
    assert {(layer, STEP) for layer in range(LAYER, len(dist))} <= unknown <= {(layer, STEP) for layer in
                                                                             range(LAYER - 1, len(dist))}
    for layer, row in enumerate(d.distance):
        for s, x in enumerate(row):
            if x is not None:
                assert close(x, dist[layer][s]), (layer, s, x, dist[layer][s])
    assert all(d.distance[layer][s] == 0.0 for layer in range(len(dist)) for s in range(STEP))  # the shared prefix
    assert [i for i, x in enumerate(d.kl) if x is None] == [STEP]
    assert all(close(x, y) for x, y in zip(d.kl, kl) if x is not None), (d.kl, kl)
    # at the divergence: each branch's top-k (the fork's as it recorded it) and the source's lens
    top_a, top_b = d.topk
    assert top_a[0][0] == greedy[d.divergence] and top_b[0][0] == hooked[d.divergence]
    lens_a, lens_b = d.lens
    assert len(lens_a) == len(dist) and all(len(row) == 5 for row in lens_a)
    final = model.lm_head.weight.shape[0]
    assert all(0 <= i < final for row in lens_a for i, _ in row)
    assert [src.summary, fork.summary] == before or _same_but_idle(before, [src.summary, fork.summary])
    src.close()
    fork.close()


def _same_but_idle(before, after):
    drop = ("idle_s", "v", "timings_ms")
    return [{k: v for k, v in s.items() if k not in drop} for s in before] == \
        [{k: v for k, v in s.items() if k not in drop} for s in after]


def test_watched_branches_are_compared_as_they_ran_edit_step_included(setup):
    client, model = setup
    n_layers = client.info["num_layers"]
    greedy = generate(model, PROMPT, N)
    hooked = generate(model, PROMPT, N, edit_layer=LAYER, edit_call=STEP, edit=scale(FACTOR))
    src = client.generate(PROMPT, max_new_tokens=N, breakpoints=[(LAYER, STEP)], record_logits=True,
                          watches=[(layer, "all") for layer in range(n_layers)])
    fork = src.fork(scale=FACTOR, breakpoints=[])
    src.run_to_end()
    d = djinn_nb.diff(src, fork)
    assert d.divergence == first_difference(greedy, hooked)
    assert d.reply.source == ["watched"] * N
    dist, kl = expected(model, greedy, hooked, b_edit_step=STEP)
    for layer, row in enumerate(d.distance):
        for s, x in enumerate(row):
            if (layer, s) == (LAYER, STEP):
                continue  # the watch at the pause itself holds the value before the edit (module docstring)
            assert x is not None and close(x, dist[layer][s]), (layer, s, x, dist[layer][s])
    assert all(close(x, y) for x, y in zip(d.kl, kl)), (d.kl, kl)
    src.close()
    fork.close()


def test_two_sampled_runs_part_where_their_tokens_do(setup):
    client, model = setup
    a = client.generate(PROMPT, max_new_tokens=N, temperature=1.0, seed=1)
    b = client.generate(PROMPT, max_new_tokens=N, temperature=1.0, seed=2)
    d = djinn_nb.diff(a, b, layers=[0, 2, 5], k=3)
    assert d.divergence == first_difference(a.token_ids, b.token_ids)
    assert d.layers == [0, 2, 5] and d.reply.unreproduced_a == d.reply.unreproduced_b == []
    dist, kl = expected(model, a.token_ids, b.token_ids)
    for j, layer in enumerate(d.layers):
        assert all(close(x, y) for x, y in zip(d.distance[j], dist[layer])), (layer, d.distance[j], dist[layer])
    assert all(close(x, y) for x, y in zip(d.kl, kl)), (d.kl, kl)
    if d.divergence is not None:
        assert len(d.topk[0]) == 3 and [len(r) for r in d.lens[0]] == [3, 3, 3]
    part = djinn_nb.diff(a, b.id, layers=[2], steps=[1, 3])
    assert part.steps == [1, 2] and part.distance == [d.distance[1][1:3]]
    a.close()
    b.close()


def test_bad_requests_are_named_errors_that_change_nothing(setup):
    client, _ = setup
    a = client.generate(PROMPT, max_new_tokens=4)
    b = client.generate(PROMPT, max_new_tokens=4, breakpoints=[(2, 2)])
    other = client.generate(PROMPT[:-1], max_new_tokens=4)
    gone = client.generate(PROMPT, max_new_tokens=4)
    gone_id = gone.id
    gone.close()
    rows = sorted((r["id"], r["state"], r["tokens"], r["bytes_held"]) for r in client.runs())
    cases = [
        (lambda: djinn_nb.diff(a, other), BadRequestError, "different prompts"),
        (lambda: djinn_nb.diff(a, gone_id), UnknownRunError, "closed, expired, or another client's"),
        (lambda: djinn_nb.diff(a, b, layers=[99]), BadRequestError, "layers must be"),
        (lambda: djinn_nb.diff(a, b, layers=[]), BadRequestError, "layers must be"),
        (lambda: djinn_nb.diff(a, b, site="nowhere"), BreakpointError, "site must be one of"),
        (lambda: djinn_nb.diff(a, b, k=0), BadRequestError, "k must be"),
        (lambda: djinn_nb.diff(a, b, steps=[0, 9]), BadRequestError, "steps is"),
        (lambda: djinn_nb.diff(a, "r999-00000000"), UnknownRunError, "no run"),
        (lambda: djinn_nb.diff("r1-x", "r2-y"), BadRequestError, "needs client="),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()
        assert sorted((r["id"], r["state"], r["tokens"], r["bytes_held"]) for r in client.runs()) == rows
    assert djinn_nb.diff(a, b).steps == [0, 1]  # b is paused in step 2: steps 0 and 1 are both finished
    for r in (a, b, other):
        r.close()


def test_another_users_run_is_unknown_and_a_diff_is_admitted_on_its_estimate(saved_models):
    from djinn_nb.core import branches
    from djinn_nb.core.engine import Engine
    from djinn_nb.serving.server import DjinnServer
    from djinn_nb.serving.users import User, digest
    from djinn_nb.core.models import build_random

    engine = Engine(build_random("gpt2-tiny", seed=7), None, "gpt2-tiny")
    users = {name: User(name, digest(name + "-token")) for name in ("ann", "ben")}
    server = DjinnServer(engine, "127.0.0.1", 0, users=users).start()
    ann = djinn_nb.connect(f"127.0.0.1:{server.port}", token="ann-token")
    ben = djinn_nb.connect(f"127.0.0.1:{server.port}", token="ben-token")
    try:
        a = ann.generate(PROMPT, max_new_tokens=N)
        b = ann.generate(PROMPT, max_new_tokens=N, temperature=1.0, seed=3)
        theirs = ben.generate(PROMPT, max_new_tokens=N)
        with pytest.raises(UnknownRunError, match="another client's"):
            djinn_nb.diff(a, theirs.id, client=ann)
        with pytest.raises(UnknownRunError):
            djinn_nb.diff(theirs, a.id)
        state = server.state
        head = engine.anatomy.head_weight
        need = branches.work_bytes(len(PROMPT), N, engine.num_layers, head.shape[1], head.shape[0],
                                   state.kv_per_position, head.element_size())
        held = state.held_bytes("ann")
        state.limits.user_max_held_bytes = held + need - 1
        with pytest.raises(QuotaError, match=f"your runs hold {held} bytes and this call would add about {need},"):
            djinn_nb.diff(a, b)
        state.limits.user_max_held_bytes = held + need
        assert djinn_nb.diff(a, b).steps == list(range(N))
    finally:
        ann.close()
        ben.close()
        server.close()


def test_every_reply_field_is_checked_by_the_client():
    from djinn_nb.wire.messages import DiffReply

    good = dict(a="r1", b="r2", prompt_len=2, tokens_a=[1], tokens_b=[2], layers=[0, 1], steps=[0],
                site="resid_post", divergence=0, distance=[[0.5], [None]], norm=[[1.0], [None]], kl=[0.1],
                source=["recomputed"])
    assert DiffReply.from_json(good).distance == [[0.5], [None]]
    for bad in ({"distance": [[0.5]]}, {"kl": []}, {"tokens_a": ["x"]}, {"extra": 1}, {"norm": [[1.0, 2.0], [1]]}):
        with pytest.raises(DjinnError):
            DiffReply.from_json({**good, **bad})


# ----- the notebook view ------------------------------------------------------------------------
def test_the_view_marks_the_divergence_and_rewinds_either_branch(embedded):
    """The embedded SmolLM2 (a tokenizer: texts in the reply). The whole view costs the diff's one
    request; a rewind button makes a run paused at the chosen step and layer of its branch."""
    from djinn_nb.notebook.branches import DiffView, diff_html, plot_diff

    client = djinn_nb.connect()
    try:
        src = client.generate("The capital of France is", max_new_tokens=6, breakpoints=[(4, 1)])
        push = torch.randn(int(client.info["hidden_size"]), generator=torch.Generator().manual_seed(0)) * 8
        fork = src.fork(add=push, breakpoints=[])
        src.run_to_end()
        with count_requests(client) as sent:
            d = djinn_nb.diff(src, fork, layers=[8, 10, 12])
            view = DiffView(d)
            page = diff_html(d)
        assert sent.n == 1, sent
        assert d.divergence == first_difference(src.token_ids, fork.token_ids) is not None
        first_b = client.decode([fork.token_ids[d.divergence]])
        assert f"step {d.divergence}" in page and first_b.replace("'", "&#x27;") in page
        assert plot_diff(d).axes[0].get_images()[0].get_array().shape == (3, 6)
        view.step.value, view.layer.value = 4, 10
        back = view.rewind("b")
        assert back is view.rewound and back.paused and (back.step, back.layer, back.site) == (4, 10, "resid_post")
        assert back.token_ids == fork.token_ids[:4]
        view.step.value = 5
        assert view.rewind("a").token_ids == src.token_ids[:5]
    finally:
        client.close()


def test_the_diff_magic(embedded):
    from IPython.utils.capture import capture_output

    from ipython_shell import djinn_shell, magic
    from djinn_nb.notebook.branches import DiffView

    with djinn_shell() as sh:
        with capture_output():
            magic(sh, "djinn_connect")
        main = sh.magics_manager.registry["DjinnMagics"]
        a = main.client.generate("The capital of France is", max_new_tokens=4)
        sh.user_ns["first"] = a
        b = main.client.generate("The capital of France is", max_new_tokens=4, temperature=1.0, seed=5)
        view = magic(sh, f"djinn_diff first {b.id} layers=1,2 k=3")
        assert isinstance(view, DiffView) and view.diff.layers == [1, 2] and view.diff.reply.b == b.id
        view.step.value = 1
        assert view.rewind("a") is main.run  # a rewind made from the view is the current run
        from IPython.core.error import UsageError

        with pytest.raises(UsageError, match="compares two runs"):
            magic(sh, "djinn_diff first")
        with pytest.raises(UsageError, match="different prompts"):
            other = main.client.generate("Hello", max_new_tokens=2)
            magic(sh, f"djinn_diff first {other.id}")
