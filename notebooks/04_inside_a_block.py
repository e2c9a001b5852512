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
# # Inside a block: sites, attention heads, the logit lens and attention patterns
#
# The quick start paused the model *after* a decoder block. A breakpoint can also stop *inside*
# one, at the places interpretability tools name (the names are TransformerLens'):
#
# | site | what it is | shape |
# | --- | --- | --- |
# | `resid_pre` | the block's input: the residual stream before it | (batch, positions, hidden) |
# | `z` | each attention head's output, before the output projection | (batch, positions, heads, head_dim) |
# | `attn_out` | the attention sub-layer's output, before it is added to the residual stream | (batch, positions, hidden) |
# | `resid_mid` | the residual stream after the attention is added, before the MLP | (batch, positions, hidden) |
# | `mlp_out` | the MLP's output, before it is added | (batch, positions, hidden) |
# | `resid_post` | the block's output (the default) | (batch, positions, hidden) |
#
# This notebook pauses at each site of one block, silences one attention head at `z` and compares
# the text, reads the *logit lens* (what the model would predict if it stopped at a layer), and draws
# the attention pattern of a block. It runs on the embedded SmolLM2-135M-Instruct on the CPU by default.

# %% tags=["parameters"]
# Parameters (papermill replaces this cell's values when it runs the notebook headless).
model = None      # None: the embedded default, SmolLM2-135M-Instruct; or "random:gpt2-tiny", a hub id, a directory
device = "cpu"    # where an embedded model runs: "cpu", "cuda:0"
address = None    # "host:port" of a running djinn-server; then model and device are the server's
prompt = "The capital of France is"
layer = 6           # the decoder block to look inside (0 is the first)
head = None         # the attention head to ablate; None: the one with the largest output at the last position
max_new_tokens = 8

# %%
# %load_ext djinn_nb

# %%
import torch

target = address if address else f"model={model} device={device}"
# client = %djinn_connect {target}
if not client.info["has_tokenizer"]:   # random models take token ids
    prompt = list(range(1, 9))
print(client.info["model"], "-", client.info["num_layers"], "layers,", client.info["num_heads"], "heads;",
      "sites:", ", ".join(client.info["sites"]))

# %% [markdown]
# ## 1. Pause at every site of one block
#
# `%djinn_break layer=6 site=...` adds a breakpoint at a site of block 6 (an unknown site is
# refused with the list of valid ones). Several sites of one block pause in forward order.

# %%
# %djinn_break clear
# %djinn_break layer={layer} site=resid_pre
# %djinn_break layer={layer} site=attn_out
# %djinn_break layer={layer} site=resid_mid
# %djinn_break layer={layer} site=mlp_out
# %djinn_break layer={layer} site=resid_post

# %%
# run = %djinn_run max_new_tokens={max_new_tokens} {prompt}
run

# %% [markdown]
# The run is paused at `resid_pre`, the block's input. Keep it, then resume to the next breakpoint,
# `attn_out`. `%djinn_inspect` shows per-position statistics; at `attn_out` it also says why there
# is no logit lens there: the lens reads the residual stream only.

# %%
resid_pre = run.activation()
run.resume()
print("paused at", run.site)
# attn_out = %djinn_inspect
attn_out

# %% [markdown]
# Resume to `resid_mid`. In this block the attention output is added to the residual stream, so
# `resid_mid` is exactly `resid_pre + attn_out`; the cell checks it bit for bit.

# %%
run.resume()
resid_mid = run.activation()
print("paused at", run.site, "- resid_mid == resid_pre + attn_out:", torch.equal(resid_mid, resid_pre + attn_out.tensor))
assert torch.equal(resid_mid, resid_pre + attn_out.tensor)

# %% [markdown]
# The same for the MLP: resume to `mlp_out`, inspect it, then to `resid_post`, the block's output,
# which the cell checks equals `resid_mid + mlp_out`.

# %%
run.resume()
# mlp_out = %djinn_inspect
mlp_out

# %%
run.resume()
resid_post = run.activation()
print("paused at", run.site, "- resid_post == resid_mid + mlp_out:", torch.equal(resid_post, resid_mid + mlp_out.tensor))
assert torch.equal(resid_post, resid_mid + mlp_out.tensor)

# %% [markdown]
# ## 2. The logit lens at a pause
#
# At a residual-stream site (`resid_pre`, `resid_mid`, `resid_post`) `%djinn_inspect` adds the
# *logit lens*: the model's final norm and output head applied to the paused hidden state, so for
# each position the tokens the model would predict if it stopped here, with their probabilities
# (`lens=5` is the default number; the same as `run.lens(k=5)`).

# %%
# post = %djinn_inspect
post

# %%
assert post.lens == run.lens(5)
print("top lens token per position:", [entries[0] for entries in post.lens_tokens])
run.run_to_end()
print("the model's own continuation:", repr(run.text))

# %% [markdown]
# ## 3. The logit lens at every layer
#
# `%djinn_lens <prompt>` runs the prompt once and records the lens at every layer without pausing:
# rows are layers (0 at the bottom), columns the prompt's positions, each cell's colour the top-1
# probability and its label the top-1 token. The last layer's row is the model's own next-token
# prediction; the cell checks that its last position is the first token the run above generated.
# Compare the lower rows with it to see at which layer each position's prediction appears.

# %%
# grid = %djinn_lens {prompt}
assert int(grid.ids[-1, -1, 0]) == run.token_ids[0]
grid.table().tail(5)        # the top-1 token of the last five layers

# %% [markdown]
# ## 4. Ablate one attention head at `z`
#
# At site `z` the paused activation holds every head's output separately,
# (batch, positions, heads, head_dim). `heads=[h]` restricts an edit to those heads, so
# `fork(heads=[h], scale=0.0)` zeroes head *h*'s output in this block (an ablation) and generates from
# there; the paused run stays as it was. Which head: the parameter `head`, or the one whose output at the
# last position has the largest norm.

# %%
# %djinn_break clear
# %djinn_break layer={layer} site=z
# zrun = %djinn_run max_new_tokens={max_new_tokens} {prompt}
z = zrun.activation()
print("z:", tuple(z.shape))
if head is None:
    head = int(z[0, -1].norm(dim=-1).argmax())
print("ablating head", head, "of layer", layer)

# %%
plain = zrun.fork(breakpoints=[])
ablated = zrun.fork(heads=[head], scale=0.0, breakpoints=[])
print("unmodified:       ", repr(plain.text))
print(f"head {head} ablated:", repr(ablated.text))
print("tokens that differ:", sum(a != b for a, b in zip(plain.token_ids, ablated.token_ids)), "of", len(plain.token_ids))

# %% [markdown]
# The same with the magic: `%djinn_resume heads=... scale=0` resumes the paused run with the head
# ablated and shows its text beside the unmodified continuation (changed tokens highlighted). Its
# tokens are those of the fork above, which the cell checks.

# %%
# zrun = %djinn_resume heads={head} scale=0
assert zrun.token_ids == ablated.token_ids
zrun

# %% [markdown]
# ## 5. The attention pattern
#
# `%djinn_attention` shows block `layer`'s attention probabilities at the paused step, one heatmap per
# head: rows are the query positions, columns the key positions they attend to. In a live Jupyter
# kernel a head selector sits above the figure; `head=3` shows one head. At the prompt pass every prompt
# position is a query; at a decoding step there is one query, the newest token, over every position so far.

# %%
# %djinn_break clear
# %djinn_break layer={layer}
# %djinn_break layer={layer} step=2
# arun = %djinn_run max_new_tokens={max_new_tokens} {prompt}
# att = %djinn_attention

# %%
print(att)
rows = att.tensor.sum(dim=-1)
print("each query's probabilities sum to 1:", torch.allclose(rows, torch.ones_like(rows), atol=1e-5))
assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)

# %% [markdown]
# Resume to the decoding step 2 and show one head there:

# %%
arun.resume()
# step_att = %djinn_attention head={head} widget=false
print(step_att, "- the query is", repr(step_att.key_tokens[-1]) if step_att.key_tokens else "the newest token")

# %% [markdown]
# ## Clean up
#
# Every run above is still on the server until closed (or its lease expires); `close=all` frees them.

# %%
# %djinn_runs close=all
