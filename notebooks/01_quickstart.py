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
# # djinn_nb quick start: pause a language model, look inside, steer it, resume
#
# This notebook walks through one breakpoint session, top to bottom. Run the cells in order
# (Shift+Enter). You need nothing but this notebook: by default the model runs inside this
# kernel, on the CPU.
#
# **What happens.** A language model generates text one token at a time. Each token comes out
# of a stack of *decoder blocks* (layers); each block reads and rewrites a vector per token,
# the *hidden state*. With djinn_nb you set a **breakpoint** after one block, run the model until it
# **pauses** there, **inspect** the hidden state, **change** it (here: multiply it by a factor, which
# is called *steering*), and **resume** to see how the generated text changes. The model, its weights
# and its cache stay on a server (in this kernel, or on a GPU machine); the notebook only gets
# small summaries and the tensors you ask for.
#
# The first cell holds the parameters; change them if you like:
# - `model`: `None` uses the embedded default, SmolLM2-135M-Instruct (30 layers; the connect cell prints how long it took to load);
# - `device`: `"cpu"` or a GPU such as `"cuda:0"`;
# - `address`: `"host:port"` of a server you started with `djinn-server --port 5556`, instead of a model here.

# %% tags=["parameters"]
# Parameters (papermill replaces this cell's values when it runs the notebook headless).
model = None      # None: the embedded default, SmolLM2-135M-Instruct; or "random:gpt2-tiny", a hub id, a directory
device = "cpu"    # where an embedded model runs: "cpu", "cuda:0"
address = None    # "host:port" of a running djinn-server; then model and device are the server's
prompt = "The capital of France is"
layer = 10            # the decoder block to pause after (0 is the first)
scale = 0.9           # the steering factor of section 6
max_new_tokens = 12   # how many tokens to generate

# %% [markdown]
# ## 1. Load the extension
#
# `%load_ext djinn_nb` adds the `%djinn_...` commands (*magics*) to this notebook. Every magic
# explains itself: run, for example, `%djinn_break?` to read its help.

# %%
# %load_ext djinn_nb

# %% [markdown]
# ## 2. Connect
#
# `%djinn_connect` with no address reaches your local djinn server, a background process on this
# machine: the first connect starts it and loads the model (the first time, the default model is
# converted from its GGUF file and cached: 34–51 s on the 2-core CPU machine where this notebook is
# tested; about 10 s once cached), every later one, from any kernel, takes a fraction of a second,
# and a restarted kernel finds its paused runs there (`client.runs()`). It exits after 30 minutes
# with no client and no paused run (`djinn-server status`, `djinn-server stop`). The cell prints how
# long it took here. With `address=host:port` it reaches a running
# `djinn-server` instead (that server has chosen the model and device). It returns a `Client`; showing it prints the model's facts, including its
# number of layers: breakpoints can go after any layer from 0 to that number minus one.
#
# `{address}`-style braces insert Python variables into a magic's line, here the parameters above
# (a value of `None` counts as not given).

# %%
# a running djinn-server chose its model and device; without an address, load one in this kernel
target = address if address else f"model={model} device={device}"
# client = %djinn_connect {target}
client

# %% [markdown]
# ## 3. Set a breakpoint
#
# `%djinn_break layer=10` makes the next runs pause right after block 10 on the *prompt pass*
# (generation step 0, when the model reads the whole prompt). `step=3` would pause at the third
# new token instead, and `step=all` at every step. `%djinn_break` alone lists the breakpoints;
# `%djinn_break clear` removes them.

# %%
# %djinn_break layer={layer}
# %djinn_break

# %% [markdown]
# ## 4. Run until the breakpoint
#
# `%djinn_run` starts a generation from the prompt written after its options. It stops at the
# first breakpoint and shows where it paused: the layer and step, the tokens generated so far (none
# yet: we paused during the prompt pass), the shape and dtype of the paused hidden state, and how
# many bytes the server holds for this run (its cache and checkpoint). `run = %djinn_run ...`
# keeps the `Run` in a variable. A cell that starts with `%%djinn_run` takes the whole cell body
# as the prompt, for long prompts. It also prints one line saying where the run paused (an
# assignment like `run = ...` shows nothing else).

# %%
# run = %djinn_run max_new_tokens={max_new_tokens} {prompt}
run

# %% [markdown]
# ## 5. Inspect the hidden state
#
# `%djinn_inspect` fetches the paused hidden state and shows, for each position of the prompt, its
# token and the norm, mean and largest value of its vector, with two plots: the norm per position
# and a histogram of all the values (the norms go on a log scale when one position dwarfs the
# others: position 0 is often an *attention sink*, with a norm many times the rest). At this site
# the table also shows the *logit lens*: the tokens the model would predict if it stopped at this
# layer. It returns an `Activation`; its `.tensor` is an ordinary `torch.Tensor` of shape
# (batch, positions, hidden size) on this machine.

# %%
# act = %djinn_inspect
act

# %%
print("shape", tuple(act.tensor.shape), "norm", round(act.tensor.norm().item(), 3))
act.table().sort_values("norm", ascending=False).head(3)   # the positions with the largest vectors (index: position)

# %% [markdown]
# ## 6. Resume with a change
#
# `%djinn_resume scale={scale}` multiplies the paused hidden state by that factor (0.9 by default)
# and lets the run continue to its end (or to its next breakpoint). Because the state was changed,
# it first computes the unmodified continuation too, and shows both after the prompt, aligned token
# by token: tokens the change replaced or inserted are highlighted on the right, the ones it
# replaced or dropped are struck through on the left. The cell after it counts the changed tokens.
# The returned `Run` now holds the generated text.

# %%
# run = %djinn_resume scale={scale}
run

# %%
unmodified = client.generate(prompt, max_new_tokens=max_new_tokens)
changed = sum(a != b for a, b in zip(unmodified.token_ids, run.token_ids))
print(f"scale {scale} after layer {layer}: {changed} of {len(run.token_ids)} token positions differ from the unmodified run")

# %% [markdown]
# ## 7. The same in plain Python
#
# The magics are a thin layer over the Python API, which scripts can use directly. Here the same
# steps by hand: generate to the breakpoint, fetch the hidden state, fork from it with a modified
# tensor, and resume the original unmodified. Scaling the tensor here gives exactly the tokens that
# `%djinn_resume scale=...` gave above.

# %%
r = client.generate(prompt, max_new_tokens=max_new_tokens, breakpoints=[layer])
h = r.activation()                                     # torch.Tensor on this machine
steered = r.fork(activation=h * scale, breakpoints=[])  # a new run from the checkpoint; r stays paused
print("steered:   ", repr(steered.text))
print("unmodified:", repr(r.resume().text))
assert steered.token_ids == run.token_ids, "the fork should match %djinn_resume scale=..."

# %% [markdown]
# ## 8. Runs on the server, and cleaning up
#
# `%djinn_runs` lists this client's runs on the server with the memory each holds; any of them can
# be picked up again with `run=ID` (in `%djinn_inspect`, `%djinn_resume`, `%djinn_steer`) or
# `client.attach(ID)`. `close=all` frees them.

# %%
# %djinn_runs

# %%
# %djinn_runs close=all

# %% [markdown]
# ## 9. Steer with a slider
#
# `%djinn_steer` shows a slider over the *steering factor* for a paused run (here a new one,
# paused at the same breakpoint). Each time you release it at a value (or type one, or use the
# arrow keys), the paused run is **forked** (copied on the server, with its hidden state multiplied
# by the factor) and the fork generates the rest of the text. The fork's text appears beside the
# unmodified one, aligned and highlighted as above, with a small plot of the share of tokens
# changed at each factor tried so far. Hover over a token of the fork to see the model's top 5
# choices at that step (the run records its logits: `record_logits=true`). While a fork is computing, the old text is dimmed under a
# "computing" line. The paused run itself is not changed, so you can try as many factors as you
# like; once the run is resumed or closed, the slider disables itself and says why.
#
# The slider needs a live kernel (JupyterLab). When this notebook runs headless, the last cell
# moves it from code instead: `w.set(v)` does what dragging to `v` does and waits for the result.
# When you are done, `w.close()` and `%djinn_runs close=all` free the server's memory.

# %%
# run = %djinn_run max_new_tokens={max_new_tokens} record_logits=true {prompt}
# w = %djinn_steer min=0 max=2 step=0.05
w

# %%
w.set(scale).comparison    # what dragging the slider to the factor shows
