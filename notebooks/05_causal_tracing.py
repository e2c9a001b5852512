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
# # Causal tracing: where does the model keep "Eiffel Tower → Paris"?
#
# Activation patching, as in ROME's figure 1: run a *clean* prompt and a *corrupted* one (the
# subject replaced), then restore the clean hidden state at one (layer, position) inside the
# corrupted run and see how much of the clean answer's probability comes back.
#
# `djinn_nb.causal_trace` builds the whole grid on the server from checkpoints: each prompt passes
# once, pausing at every layer in turn, and each layer's row is one `fork_many` of the corrupted
# run — one fork per position, each with the clean activation patched in at that position, run
# to the next token as one batch. No cell reruns the layers before its own, and no hidden state
# crosses the wire. It runs on the embedded SmolLM2-135M-Instruct on the CPU by default.

# %% tags=["parameters"]
# Parameters (papermill replaces this cell's values when it runs the notebook headless).
model = None      # None: the embedded default, SmolLM2-135M-Instruct; or "random:gpt2-tiny", a hub id, a directory
device = "cpu"    # where an embedded model runs: "cpu", "cuda:0"
address = None    # "host:port" of a running djinn-server; then model and device are the server's
clean = "The Eiffel Tower is located in the city of"
corrupted = "The Colosseum is located in the city of"   # same number of tokens, another subject
site = "resid_post"   # where the clean state is restored in sections 2, 3 and 6: resid_pre, resid_mid, resid_post, ...

# %%
import time

import matplotlib.pyplot as plt

import djinn_nb
from djinn_nb.notebook.plots import show

client = djinn_nb.connect(address) if address else djinn_nb.connect(model=model, device=device)
if not client.info["has_tokenizer"]:   # random models take token ids
    clean, corrupted = [5, 17, 42, 99, 3, 250, 11, 7], [5, 17, 42, 31, 60, 250, 11, 7]
print(client.info["model"], "-", client.info["num_layers"], "layers on", client.info["device"])

# %% [markdown]
# ## 1. The two prompts, token by token
#
# Patching works position by position, so both prompts must have the same number of tokens.

# %%
def tokens(prompt):
    ids = client.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
    return [client.decode([i]) for i in ids] if client.info["has_tokenizer"] else ids

clean_tokens, corrupt_tokens = tokens(clean), tokens(corrupted)
print(len(clean_tokens), "clean:    ", clean_tokens)
print(len(corrupt_tokens), "corrupted:", corrupt_tokens)
for prompt in (clean, corrupted):
    with client.generate(prompt, max_new_tokens=4) as run:
        print(repr(prompt), "->", repr(run.text) if client.info["has_tokenizer"] else run.token_ids)

# %% [markdown]
# ## 2. The grid
#
# The answer is the clean run's greedy next token. Each cell is p(answer) when that position's
# clean state is restored at that layer; `clean_prob` (the clean run's own probability) and
# `corrupt_prob` (nothing restored) are marked on the colour bar. They are references, not
# bounds: a cell may exceed the clean run's probability.

# %%
t0 = time.perf_counter()
mine_before = {r["id"] for r in client.runs()}  # the server's runs of yours, from any kernel
trace = djinn_nb.causal_trace(client, clean, corrupted, site=site)
seconds = time.perf_counter() - t0
answer = trace.attrs["answer_text"] if trace.attrs["answer_text"] is not None else trace.attrs["answer"]
cells = trace.shape[0] * trace.shape[1]
print(f"answer {answer!r}: clean p = {trace.attrs['clean_prob']:.4f}, corrupted p = {trace.attrs['corrupt_prob']:.6f}")
print(f"{cells} cells ({trace.shape[0]} layers x {trace.shape[1]} positions) in {seconds:.1f} s on {client.info['device']}, "
      f"measured just now")
trace.round(3)

# %%
fig = djinn_nb.plot_causal_trace(trace, title=f"restoring the clean {site} into the corrupted run")
show(fig)
plt.close(fig)

# %% [markdown]
# ## 3. Where it matters
#
# For each position, the layer where restoring it helps most. In ROME's picture, the last subject
# token matters in early-to-middle layers and the last prompt token in late ones.

# %%
best = trace.idxmax(axis=0)
summary = [(str(col), int(best[col]), float(trace[col].max())) for col in trace.columns]
for col, layer, p in sorted(summary, key=lambda r: -r[2])[:4]:
    print(f"{col!r:>16}: best at layer {layer:2d}, p(answer) = {p:.3f}")

# %% [markdown]
# ## 4. Three panels: the residual stream, the MLPs, the attention
#
# ROME's figure shows the same grid at three sites: restoring the whole residual stream, only a
# block's MLP output (`mlp_out`), or only its attention output (`attn_out`) at one (layer, position).
# In ROME's picture the MLPs carry the fact at the last subject token in early-to-middle layers,
# and attention moves it to the last token late. (ROME restores a window of ten layers per cell;
# these cells restore one layer each, so the MLP and attention panels are fainter.)

# %%
panels = [trace] + [djinn_nb.causal_trace(client, clean, corrupted, site=s, progress=False)
                    for s in ("mlp_out", "attn_out")]
fig = djinn_nb.plot_trace_panels(panels)
show(fig)
plt.close(fig)

# %% [markdown]
# ## 5. Which heads?
#
# At `z` (each head's output before the attention's output projection) the grid is layers × heads:
# a cell restores one head's clean `z` at every position, the layer's other heads left corrupted.

# %%
heads = djinn_nb.causal_trace(client, clean, corrupted, site="z", heads="all", progress=False)
fig = djinn_nb.plot_causal_trace(heads, title="restoring one head's clean z (all positions)")
show(fig)
plt.close(fig)
best_heads = djinn_nb.top_k_of(heads, 3)
print("heads that restore most (layer, head):", best_heads)

# %% [markdown]
# ## 6. A cheap first pass: attribution patching
#
# `attribution_patching` estimates every cell at once from one clean and one corrupted forward
# and one backward on the server: (clean − corrupted activation) · ∂metric/∂activation in the
# corrupted run. With `metric="prob"` each cell estimates the change in p(answer). Beside it, the
# exact grid (its ten highest cells outlined on both): how well does the estimate rank them?

# %%
t0 = time.perf_counter()
estimate = djinn_nb.attribution_patching(client, clean, corrupted, site=site, metric="prob")
estimate_s = time.perf_counter() - t0
agreement = djinn_nb.rank_agreement(estimate, trace, k=20)
print(f"estimate of {estimate.size} cells in {estimate_s:.2f} s (the exact grid: {seconds:.1f} s); "
      f"Spearman {agreement['spearman']:.2f}; the exact top 10 within the estimate's top 20: {agreement['recall']:.0%}")
fig = djinn_nb.plot_grids_side_by_side(estimate, trace)
show(fig)
plt.close(fig)

# %% [markdown]
# Then patch exactly only the cells the estimate ranks highest: `cells=` computes those and leaves
# every other cell NaN.

# %%
cells = djinn_nb.top_k_of(estimate, 20)
t0 = time.perf_counter()
chosen = djinn_nb.causal_trace(client, clean, corrupted, site=site, cells=cells, progress=False)
print(f"{int(chosen.notna().sum().sum())} cells patched exactly in {time.perf_counter() - t0:.1f} s")
found = chosen.stack().sort_values(ascending=False).head(5)
print(f"best cell found this way: p = {found.iloc[0]:.4f}; best of the whole grid: p = {trace.max().max():.4f}")
found.to_frame("p(answer)")

# %% [markdown]
# Nothing is left on the server: `causal_trace` and `attribution_patching` close every run they
# started (the estimate makes none, and leaves no gradient behind).

# %%
left = [r for r in client.runs() if r["id"] not in mine_before]
print("runs it left on the server:", len(left))
assert not left
