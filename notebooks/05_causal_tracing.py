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
site = "resid_post"   # where the clean state is restored: resid_pre, attn_out, resid_mid, mlp_out, resid_post

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
# Nothing is left on the server: `causal_trace` closes every run it started.

# %%
left = [r for r in client.runs() if r["id"] not in mine_before]
print("runs it left on the server:", len(left))
assert not left
