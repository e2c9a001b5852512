# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Features and branches: train a small SAE, break on a feature, clamp it, compare the branches
#
# Sparse autoencoders (SAEs) are how interpretability reads a residual stream now: each position's
# hidden state is written as a sparse sum of learned directions, the *features*. A debugger can use
# them at a live, paused generation: read which features are active, pause when one fires, set it
# to zero, and see what the model says instead. This notebook, on the embedded SmolLM2-135M-Instruct
# on the CPU:
#
# 1. collects the residual stream at one layer over a few hundred tokens of varied text (one call);
# 2. trains a small SAE on it in plain torch (about ten seconds) and saves it in SAELens's format;
# 3. loads it on the server and reads the features at a pause (`run.features`, `%djinn_features`);
# 4. breaks on a feature (`when="feature(sae1, N) > x"`), clamps it to 0 (`run.fork(clamp=...)`);
# 5. compares the clamped branch with the original (`djinn_nb.diff`, `%djinn_diff`).
#
# The SAE is a toy (a few hundred training tokens; real ones see millions): what it shows is the
# mechanics, which are the same for an SAE from SAELens or Gemma Scope.

# %% tags=["parameters"]
# Parameters (papermill replaces this cell's values when it runs the notebook headless).
model = None      # None: the embedded default, SmolLM2-135M-Instruct; or "random:gpt2-tiny", a hub id, a directory
device = "cpu"    # where an embedded model runs: "cpu", "cuda:0"
address = None    # "host:port" of a running djinn-server; then model and device are the server's
prompt = "The capital of France is"
max_new_tokens = 16
layer = None      # the SAE's layer; None: a third of the way into the model (10 of SmolLM2's 30)
site = "resid_pre"  # the residual stream entering that block: SAELens's blocks.<layer>.hook_resid_pre
d_sae = 512       # the SAE's number of features
train_steps = 300  # full-batch Adam steps
l1 = 1.0          # the sparsity penalty's weight
sae_dir = None    # where to save the SAE; the server reads it from there (None: a fresh temporary directory)

# %%
# %load_ext djinn_nb

# %%
import json
import os
import tempfile
import time

import torch
from safetensors.torch import save_file

import djinn_nb
from djinn_nb.notebook.plots import figure_class

target = address if address else f"model={model} device={device}"
# client = %djinn_connect {target}
has_tokenizer = client.info["has_tokenizer"]
if layer is None:
    layer = client.info["num_layers"] // 3
print(client.info["model"], "-", client.info["num_layers"], "layers; the SAE reads", f"blocks.{layer}.hook_{site}")

# %% [markdown]
# ## 1. Activations to train on
#
# A paused run hands over its activation at the pause as one tensor: pausing the prompt pass of
# one long prompt at `(layer, 0, site)` gives the residual stream at every position of it in one
# call.

# %%
texts = [
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre and its cafes.",
    "Berlin is the capital of Germany, and Madrid is the capital of Spain. Rome is the capital of Italy.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for i in range(10):\n    print(i * i)\n",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY name;",
    "Photosynthesis converts light into chemical energy: plants take in carbon dioxide and water and release oxygen.",
    "The mitochondria is the powerhouse of the cell, producing ATP through oxidative phosphorylation.",
    "Once upon a time, a little girl lived in a small house at the edge of a dark forest with her grandmother.",
    "She picked up her guitar, tuned the strings, and began to play a quiet song about the sea.",
    "In 1969, Neil Armstrong and Buzz Aldrin landed on the Moon, while Michael Collins orbited above them.",
    "The Second World War ended in 1945. The United Nations was founded the same year in San Francisco.",
    "To bake bread, mix 500 grams of flour with 10 grams of salt, 7 grams of yeast and 350 ml of warm water.",
    "Preheat the oven to 200 degrees, then roast the potatoes with olive oil, garlic and rosemary for 40 minutes.",
    "The stock market fell sharply on Monday as investors worried about rising interest rates.",
    "Dear Sir or Madam, I am writing to apply for the position of research assistant.",
    "Q: What is 12 times 7?\nA: 84.\nQ: What is the boiling point of water at sea level?\nA: 100 degrees Celsius.",
    "The derivative of x squared is 2x, and the integral of 1/x is the natural logarithm of x.",
    "Water is made of two hydrogen atoms and one oxygen atom. Its chemical formula is H2O.",
    "The cat sat on the mat and watched the birds outside the window. Then it fell asleep in the sun.",
    "Football is the most popular sport in the world; the World Cup is held every four years.",
    "Tokyo is the largest city in Japan, famous for its trains, temples and food markets.",
    "The patient was given antibiotics for the infection and told to rest for a week.",
    "Shakespeare wrote Hamlet, Macbeth and Romeo and Juliet. He was born in Stratford-upon-Avon in 1564.",
    "The train to London leaves at 9:15 from platform 4 and arrives at 11:40.",
    "Happy birthday! I hope your day is full of joy, cake and friends.",
    "The quick brown fox jumps over the lazy dog.",
]
if has_tokenizer:
    corpus = "\n\n".join(texts)
else:  # a random model takes token ids
    prompt = list(range(1, 9))
    n = min(600, client.info["max_positions"] - 1)
    corpus = torch.randint(1, min(200, client.info["vocab_size"]), (n,), generator=torch.Generator().manual_seed(0)).tolist()
t0 = time.perf_counter()
reader = client.generate(corpus, max_new_tokens=1, breakpoints=[(layer, 0, site)])
X = reader.activation()[0].float()      # (positions, hidden)
corpus_ids = reader.prompt_ids
reader.close()
print(f"{X.shape[0]} positions x {X.shape[1]} dimensions in {time.perf_counter() - t0:.1f} s")

# %% [markdown]
# ## 2. Train a small SAE in plain torch
#
# A standard SAE: `f = relu((x - b_dec) @ W_enc + b_enc)`, `x̂ = f @ W_dec + b_dec`, trained to
# reconstruct `x` with an L1 penalty on `f` (weighted by each decoder row's norm, so that shrinking
# the decoder cannot dodge it). It trains on activations scaled to an average norm of
# `sqrt(hidden)`, and the scale is then folded into the weights, so the saved SAE reads the raw
# residual stream (SAELens's `normalize_activations="none"`). A fifth of the positions are held out
# to measure how well it reconstructs text it did not see.

# %%
torch.manual_seed(0)
perm = torch.randperm(X.shape[0])
held = X[perm[: X.shape[0] // 5]]
train = X[perm[X.shape[0] // 5:]]
d_in = X.shape[1]
scale = train.norm(dim=-1).mean() / d_in ** 0.5
Xs = train / scale

W_dec = torch.nn.Parameter(torch.randn(d_sae, d_in) / d_in ** 0.5 * 0.1)
W_enc = torch.nn.Parameter(W_dec.detach().t().clone())
b_enc = torch.nn.Parameter(torch.zeros(d_sae))
b_dec = torch.nn.Parameter(Xs.median(0).values.clone())
opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=3e-3)
t0 = time.perf_counter()
for _ in range(train_steps):
    f = torch.relu((Xs - b_dec) @ W_enc + b_enc)
    loss = (f @ W_dec + b_dec - Xs).pow(2).sum(-1).mean() + l1 * (f * W_dec.norm(dim=-1)).sum(-1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
train_s = time.perf_counter() - t0

with torch.no_grad():  # the scale folded in: these weights read the raw residual stream
    weights = {"W_enc": (W_enc / scale).contiguous(), "b_enc": b_enc.detach().clone(),
               "W_dec": (W_dec * scale).contiguous(), "b_dec": (b_dec * scale).detach().clone()}


def encode(x: torch.Tensor) -> torch.Tensor:
    """The SAE's features of activations x (..., hidden), as SAELens's encode computes them."""
    return torch.relu((x.float() - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])


def explained_variance(x: torch.Tensor) -> float:
    x_hat = encode(x) @ weights["W_dec"] + weights["b_dec"]
    return float(1 - (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


print(f"trained {d_sae} features on {train.shape[0]} positions in {train_s:.1f} s ({train_steps} Adam steps)")
print(f"explained variance: {explained_variance(train):.3f} on the training positions, "
      f"{explained_variance(held):.3f} on the {held.shape[0]} held out; "
      f"{(encode(train) > 0).float().sum(-1).mean():.1f} features active per position on average")

# %% [markdown]
# Save it as SAELens saves one: a directory with `cfg.json` and `sae_weights.safetensors`. The
# server reads it from its own disk; here the server runs on this machine. (With `address=` of a
# server elsewhere, `sae_dir` must be a directory that server reads, e.g. one given to it with
# `--sae-dir`.) Each feature gets a label for the tables below: the corpus token where it is most
# active, with the token before it.

# %%
path = os.path.abspath(sae_dir) if sae_dir else tempfile.mkdtemp(prefix="djinn_sae_")
os.makedirs(path, exist_ok=True)
save_file(weights, os.path.join(path, "sae_weights.safetensors"))
cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
       "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
       "metadata": {"hook_name": f"blocks.{layer}.hook_{site}"}}
with open(os.path.join(path, "cfg.json"), "w") as f:
    json.dump(cfg, f, indent=2)

token_texts = client.decode_each(corpus_ids) if has_tokenizer else [f"#{i}" for i in corpus_ids]
F_corpus = encode(X)
best = F_corpus.argmax(0).tolist()
labels = {n: repr("".join(token_texts[max(p - 1, 0):p + 1])) for n, p in enumerate(best) if F_corpus[p, n] > 0}

sae = client.load_sae(path, site=(layer, site), labels=labels)
sae

# %% [markdown]
# ## 3. Read the features at a pause
#
# Generate with a breakpoint at the SAE's layer and site on the prompt pass, and a *watch* there at
# every step (recorded on the server without pausing; used below). `run.features(sae, k=5)` is,
# per position, the five most active features and their activations, computed on the server; here
# it is checked against the SAE applied in this notebook to the same activation.

# %%
run = client.generate(prompt, max_new_tokens=max_new_tokens, breakpoints=[(layer, 0, site)],
                      watches=[(layer, "all", site)])
rows = run.features(sae, k=5)
local = encode(run.activation()[0])
for row, f in zip(rows, local):
    ids = [n for n, _ in row]
    assert torch.allclose(torch.tensor([a for _, a in row]), f[ids], rtol=1e-4, atol=1e-4)
    assert min(a for _, a in row) >= f.topk(6).values[-1] - 1e-4   # they are the top 5
rows

# %% [markdown]
# The same as a table, with the tokens and the features' labels:

# %%
# %djinn_features k=5 sae=sae run={run.id}

# %% [markdown]
# ## 4. Break on a feature
#
# Resume the run to its end: its watch recorded the residual stream at every step, from which the
# notebook computes each step's features. A feature that is silent for the first steps and then
# fires makes a condition worth breaking on. Which of these matter to what the model says? Rewind
# the finished run to the step where one first fires (a new run paused there, from the run's KV
# cache) and fork it with that feature clamped to 0: the first candidate whose clamp changes the
# text is the one to look at.

# %%
run.resume()
print(repr(run.text) if has_tokenizer else run.token_ids)
hits = run.watched()
F = torch.stack([encode(run.watched_activation(h["index"])[0]).max(0).values for h in hits])  # (steps, d_sae)
assert [h["step"] for h in hits] == list(range(F.shape[0]))
dec_norm = weights["W_dec"].norm(dim=-1)
candidates = sorted(((float(F[s, n] * dec_norm[n]), s, n) for s in range(2, F.shape[0])
                     for n in ((F[s] > 0) & (F[:s].max(0).values == 0)).nonzero().flatten().tolist()), reverse=True)
print("features first firing at step >= 2 (largest contribution first):",
      [(f"feature {n}", f"step {s}") for _, s, n in candidates[:5]])
chosen = None
for _, s, n in candidates[:8]:
    back = run.rewind(s, layer=layer, site=site)
    trial, = back.fork_many([{"clamp": {n: 0.0}, "sae": sae, "breakpoints": [], "close": True}])
    back.close()
    changed = trial.token_ids != run.token_ids
    print(f"  feature {n} (step {s}) clamped to 0:", "changes the text" if changed else "same text")
    if changed:
        chosen = (s, n)
        break
if chosen is None:  # e.g. on a random model: then the branches below will not part
    print("no candidate's clamp changes the text; taking the first")
    chosen = candidates[0][1:]
step, feature = chosen
threshold = round(float(F[step, feature]) / 2, 4)
print(f"feature {feature} ({sae.label(feature)}): {float(F[step, feature]):.3f} at step {step}; "
      f"at most {float(F[:step, feature].max()):.3f} before")

# %% [markdown]
# The chosen feature's activation at each step (the largest over the step's positions), as the
# watch recorded it, and the threshold the breakpoint below uses:

# %%
fig = figure_class()(figsize=(8, 2.8), layout="constrained")   # a Figure that shows itself as a PNG
ax = fig.subplots()
ax.bar(range(F.shape[0]), F[:, feature].tolist(), color=["#d62728" if s == step else "#999" for s in range(F.shape[0])])
ax.axhline(threshold, color="#1f77b4", linestyle="--", linewidth=1, label=f"threshold {threshold}")
words = client.decode_each(run.token_ids) if has_tokenizer else [str(t) for t in run.token_ids]
ax.set_xticks(range(F.shape[0]), [f"{s}\n{w!r}"[:14] for s, w in enumerate(words[:F.shape[0]])], fontsize=7)
ax.set_ylabel(f"feature {feature}")
ax.set_xlabel("step (and the token it generated)")
ax.legend(fontsize=8)
fig

# %% [markdown]
# The condition `feature(<sae id>, N) > x` is the largest activation of feature N over the step's
# positions at the breakpoint's layer and site. The server tests it at every step, with no round
# trip to this notebook, and pauses at the first step where it holds: the step the watch showed.
# This run also watches the output of every block at every step: its forks inherit the watches,
# and the comparison in section 5 reads the branches' states from them.

# %%
when = f"feature({sae.id}, {feature}) > {threshold}"
paused = client.generate(prompt, max_new_tokens=max_new_tokens,
                         breakpoints=[{"layer": layer, "step": "all", "site": site, "when": when}],
                         watches=[(i, "all") for i in range(client.info["num_layers"])])
print(f"when={when!r}: paused at step {paused.step}, layer {paused.layer} {paused.site}")
assert paused.paused and paused.step == step
value = max(a for row in paused.features(sae, ids=[feature]) for _, a in row)
assert value > threshold and abs(value - float(F[step, feature])) < 1e-3 * max(1.0, value)
paused

# %%
# %djinn_features k=5 sae=sae run={paused.id}

# %% [markdown]
# ## 5. Clamp it, and compare the branches
#
# `fork(clamp={N: 0.0}, sae=sae)` sets feature N to 0 and writes back `h + decode(f') - decode(f)`:
# only that feature's decoder direction is taken out, and what the SAE does not reconstruct (its
# error term) is kept. Two forks of the paused run, one unchanged and one clamped, are the two
# branches. The clamp equals an edit made by hand: the activation minus the feature's activation
# times its decoder row, given as `activation=`. (Encoding the state written back need not give
# exactly 0 for the feature: the SAE's encoder and decoder rows are not exact inverses.)

# %%
original = paused.fork(breakpoints=[])
clamped = paused.fork(clamp={feature: 0.0}, sae=sae, breakpoints=[])
h = paused.activation()
by_hand = paused.fork(activation=h - encode(h)[..., feature, None] * weights["W_dec"][feature], breakpoints=[],
                      close=True)
assert clamped.token_ids == by_hand.token_ids
assert original.token_ids == run.token_ids   # an unchanged fork continues as the run did
after = float(encode(h - encode(h)[..., feature, None] * weights["W_dec"][feature])[..., feature].max())
print(f"feature {feature} re-encoded after the clamp: {after:.3f} (was {value:.3f})")
if has_tokenizer:
    print("original:", repr(original.text))
    print("clamped: ", repr(clamped.text))

# %% [markdown]
# `djinn_nb.diff(a, b)` compares two runs of one prompt on the server: the first step whose tokens
# differ, the distance between their residual streams at every (layer, step), the KL between their
# next-token distributions, and each one's top tokens and logit lens where they part. Before the
# clamped step the two branches are the same run; in that step they are the same up to the clamped
# block's input, and differ from it on. (The KL of the clamped step itself is left out, None: the
# server recomputes a step's distribution from the run's cache, which the edit in that step
# defeats; the watches give the states.)

# %%
d = djinn_nb.diff(original, clamped)
first = next((i for i, (a, b) in enumerate(zip(original.token_ids, clamped.token_ids)) if a != b), None)
assert d.divergence == first and (first is None or first >= step)
js = d.steps.index(step)
for j in range(js):  # the shared past: the same states, the same distributions
    assert all(row[j] == 0 for row in d.distance) and d.kl[j] == 0
at_step = [row[js] for row in d.distance]
assert all(x == 0 for x in at_step[:layer]) and all(x > 0 for x in at_step[layer:])
print(f"divergence at step {d.divergence}; at step {step} the states part at block {layer}: distance "
      f"{at_step[layer]:.1f} after it, {at_step[-1]:.1f} after the last block")
d

# %% [markdown]
# The same as a view: the two texts aligned with the divergence marked, a layer × step heatmap of
# the distance with the KL beneath, and a step and layer to rewind either branch to.

# %%
# %djinn_diff original clamped

# %% [markdown]
# The controls as magics, on a run paused at the SAE's layer and site: `%djinn_features k=10`,
# `%djinn_break layer=10 step=all site=resid_pre when="feature(sae1, 42) > 2"`, and
# `%djinn_steer feature=42 min=0 max=10`, a slider over one feature's value.

# %%
for r in (run, paused):   # the two branches stay open for the view's rewind buttons
    r.close()
client.unload_sae(sae)
if not sae_dir:
    for name in ("cfg.json", "sae_weights.safetensors"):
        os.remove(os.path.join(path, name))
    os.rmdir(path)
print("SAEs left loaded:", [s.id for s in client.saes()])
