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
# # Steering: how scaling one layer's hidden state changes the output
#
# For a prompt, pause the model after a layer, then fork the paused run once per *scale factor*,
# multiplying that layer's output by the factor, and compare each fork with the unmodified
# continuation. Three measures, as in the steering literature:
#
# - **token change rate**: the fraction of generated tokens that differ from the unmodified run;
# - **KL divergence** of the next-token distribution at the edited step, KL(unmodified ‖ steered), in nats;
# - **relative logit change**: ‖steered logits − unmodified logits‖ / ‖unmodified logits‖ at that step.
#
# The sweep runs as a plain loop (`djinn_nb.notebook.metrics.steering_sweep`), so every table and figure here
# is produced headless too; the interactive slider is at the end.

# %% tags=["parameters"]
# Parameters (papermill replaces this cell's values when it runs the notebook headless).
model = None      # None: the embedded default, SmolLM2-135M-Instruct; or "random:gpt2-tiny", a hub id, a directory
device = "cpu"    # where an embedded model runs: "cpu", "cuda:0"
address = None    # "host:port" of a running djinn-server; then model and device are the server's
prompt = "The capital of France is"
layers = None       # None: the layers at 25 %, 50 % and 75 % of the model's depth
factors = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0]
max_new_tokens = 12

# %%
import pandas as pd
from IPython.display import display

import djinn_nb
from djinn_nb.notebook import plots
from djinn_nb.notebook.metrics import steering_sweep

client = djinn_nb.connect(address) if address else djinn_nb.connect(model=model, device=device)
n = client.info["num_layers"]
layers = layers or sorted({round(n * f) for f in (0.25, 0.5, 0.75)})
if not client.info["has_tokenizer"]:          # random models take token ids
    prompt = list(range(1, 9))
print(client, "layers", layers)

# %% [markdown]
# ## The sweep
#
# One row per (layer, factor); factor 1.0 is the unmodified run, so its row is all zeros.

# %%
mine_before = {r["id"] for r in client.runs()}  # the server's runs of yours, from any kernel
sweep = steering_sweep(client, prompt, layers, factors, max_new_tokens=max_new_tokens)
sweep[["layer", "factor", "token_change_rate", "kl", "logit_change", "fork_ms"]].round(4)

# %% [markdown]
# ## Effect against the factor

# %%
plots.show(plots.plot_steering_effect(sweep))

# %% [markdown]
# ## What the model says at each factor
#
# The continuation of each fork, for the middle layer.

# %%
mid = layers[len(layers) // 2]
# a Styler keeps line breaks as line breaks (a DataFrame's HTML writes them as a literal \n)
(sweep[sweep.layer == mid][["factor", "token_change_rate", "text"]].style.hide(axis="index")
 .format({"factor": "{:g}", "token_change_rate": "{:.2f}"})
 .set_properties(subset=["text"], **{"white-space": "pre-wrap", "text-align": "left", "font-family": "monospace"}))

# %% [markdown]
# ## Where a fork's time goes
#
# Each fork's client wall time splits into the server's own time (copying the checkpoint and
# running the layers after the breakpoint and the rest of generation) and the transport (RPC and
# serialisation). Deeper layers leave fewer layers to rerun.

# %%
lat = pd.DataFrame({
    "label": [f"layer {l}" for l in sweep.layer],
    "remaining_ms": sweep.server_ms,
    "transport_ms": sweep.transport_ms,
})
display(plots.latency_breakdown_table(lat))
plots.show(plots.plot_latency_breakdown(lat))
assert {r["id"] for r in client.runs()} == mine_before, "the sweep closed every run and fork it started"

# %% [markdown]
# ## The slider (live kernel)
#
# The same experiment by hand: a paused run at the middle layer and a slider over the factor. In
# JupyterLab, drag it (hover over a token for the model's top choices there); headless, the
# loop below moves it from code and shows each result. The slider stays live after Run All;
# when you are done, `w.close(); run.close()` frees the paused run on the server.

# %%
from djinn_nb.notebook.widgets import SteeringWidget

run = client.generate(prompt, max_new_tokens=max_new_tokens, breakpoints=[mid], record_logits=True)
w = SteeringWidget(client, run, min=0, max=2, step=0.05)
w

# %%
for v in (0.5, 1.5):
    display(w.set(v).comparison)

