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
# # A debugger's control flow: break when the model is unsure, step, and go back
#
# A breakpoint at a fixed step is where you start. A debugger also lets you break *when something
# happens*, step forward a layer or a token at a time, and go back when you have gone too far.
# This notebook:
#
# 1. pauses only at the steps where the model is unsure (`when="top1_prob < 0.5"`), a condition
#    the server tests at every step with no round trip to this notebook;
# 2. steps to the next layer and the next token;
# 3. shows the run's token history (entropy as colour, alternatives on hover) and rewinds to the
#    most uncertain step, reusing the run's KV cache, to try an edit there.
#
# It runs on the embedded SmolLM2-135M-Instruct on the CPU by default.

# %% tags=["parameters"]
# Parameters (papermill replaces this cell's values when it runs the notebook headless).
model = None      # None: the embedded default, SmolLM2-135M-Instruct; or "random:gpt2-tiny", a hub id, a directory
device = "cpu"    # where an embedded model runs: "cpu", "cuda:0"
address = None    # "host:port" of a running djinn-server; then model and device are the server's
prompt = "The capital of France is"
max_new_tokens = 16
threshold = 0.5   # pause where the most likely next token has less probability than this

# %%
# %load_ext djinn_nb

# %%
import djinn_nb
from djinn_nb.notebook.history import TokenHistory

target = address if address else f"model={model} device={device}"
# client = %djinn_connect {target}
if not client.info["has_tokenizer"]:   # random models take token ids
    prompt = list(range(1, 9))
layer = client.info["num_layers"] * 2 // 3
print(client.info["model"], "-", client.info["num_layers"], "layers; watching layer", layer)

# %% [markdown]
# ## 1. Break when the model is unsure
#
# The condition is about the output of the step being examined: the run pauses at layer `layer` of
# every step whose next-token distribution has a top-1 probability below the threshold, and
# nowhere else. The pause shows exactly what an unconditional breakpoint at that step would.

# %%
when = f"top1_prob < {threshold}"
unsure = {"layer": layer, "step": "all", "when": when}
run = client.generate(prompt, max_new_tokens=max_new_tokens, breakpoints=[unsure])
print(f"paused at step {run.step}, layer {run.layer}" if run.paused else f"never paused: {run.state}")
run

# %% [markdown]
# What would the model say if it stopped at this layer? The logit lens at the last position:

# %%
if run.paused:
    last = run.lens(k=5)[-1]
    print([(client.decode([i]) if client.info["has_tokenizer"] else i, round(p, 3)) for i, p in last])

# %% [markdown]
# Resuming goes on to the next step that meets the condition. Collect every step where it held:

# %%
unsure_steps = []
while run.paused:
    unsure_steps.append(run.step)
    run.resume()
print("the model was unsure at steps", unsure_steps, "of", len(run.token_ids))
print(repr(run.text) if client.info["has_tokenizer"] else run.token_ids)

# %% [markdown]
# ## 2. Step: the next layer, the next token
#
# `next_layer()` pauses at the next block's output in the same step; `next_step()` at the same
# layer one token later — whatever the breakpoints, which apply again afterwards.

# %%
stepper = client.generate(prompt, max_new_tokens=max_new_tokens, breakpoints=[unsure])
if stepper.paused and stepper.layer + 1 < client.info["num_layers"]:
    print("paused by the condition:", stepper.layer, stepper.site, "step", stepper.step)
    stepper.next_layer()
    print("after next_layer:       ", stepper.layer, stepper.site, "step", stepper.step)
    stepper.next_step()
    print("after next_step:        ", stepper.layer, stepper.site, "step", stepper.step)
stepper.close()

# %% [markdown]
# ## 3. The token history, and going back
#
# Each token is shaded by the entropy of the distribution it was chosen from; hover a token for its
# step and top alternatives. The same view is `%djinn_history`.

# %%
history = TokenHistory(run.history(), client.decode(run.prompt_ids) if client.info["has_tokenizer"] else None)
# the steps the server paused at are exactly those whose top-1 probability the history shows below the threshold
assert unsure_steps == [h["step"] for h in history.records if h["topk"][0][1] < threshold]
history

# %% [markdown]
# Rewind to the most uncertain step, at the same layer: a new run paused there, built from the
# finished run's KV cache (nothing before that step is recomputed). From it, the unmodified
# continuation reproduces the original text, and an edit shows what that layer does there.

# %%
step = history.most_uncertain
back = run.rewind(step, layer=layer)
print(f"rewound to step {back.step}, layer {back.layer}; {len(back.token_ids)} tokens kept")
same = back.fork(breakpoints=[])
assert same.token_ids == run.token_ids   # going back changes nothing by itself
edited = back.fork(scale=0.0, breakpoints=[])
if client.info["has_tokenizer"]:
    print("original:            ", repr(run.text))
    print(f"layer {layer} zeroed at step {step}:", repr(edited.text))
else:
    print(run.token_ids, edited.token_ids, sep="\n")

# %% [markdown]
# The same controls as magics: `%djinn_break layer=20 step=all when="entropy > 2.5"`,
# `%djinn_next_layer`, `%djinn_next_step`, `%djinn_rewind step=4 layer=20`, `%djinn_history`.

# %%
# %djinn_rewind run={run.id} step={step} layer={layer}

# %%
# %djinn_history run={run.id}

# %%
for r in client.runs():
    client.attach(r["id"]).close()
print("runs left on the server:", len(client.runs()))
