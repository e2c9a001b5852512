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
# # Reproducing experiment 3: white-box breakpoint debugging
#
# This notebook runs the experiment in `experiments/exp3_whitebox/` (see its README) and draws its
# tables and figures from the result files it writes:
#
# 1. **token accuracy** of paused-and-resumed generation against the unpaused one, per breakpoint
#    layer and trial (the study reports 100 %);
# 2. the **latency breakdown** of a pause and a restore: checkpoint capture, restoring the
#    checkpoint (fork copy), the remaining layers, and transport;
# 3. the **steering** demo (one factor) and, beyond the study, the steering effect over a range
#    of factors;
# 4. the study's comparative table.
#
# The experiment loads its model in this kernel (`address` is not used by it; the factor sweep
# at the end uses it when given).

# %% tags=["parameters"]
# Parameters (papermill replaces this cell's values when it runs the notebook headless).
model = None      # None: the embedded default, SmolLM2-135M-Instruct; or "random:gpt2-tiny", a hub id, a directory
device = "cpu"    # where an embedded model runs: "cpu", "cuda:0"
address = None    # "host:port" of a running djinn-server; then model and device are the server's
config = "cpu_default.yaml"   # a file in experiments/exp3_whitebox/configs/
output_dir = None             # None: a folder under experiments/out/
skip_pytorch = False          # skip the plain-PyTorch baseline
skip_vllm = False             # skip the vLLM baseline (recorded as "not run" where vLLM is absent)
factors = [0.0, 0.5, 0.8, 0.9, 1.0, 1.1, 1.2, 1.5, 2.0]

# %%
import importlib
import json
import os
from pathlib import Path

import pandas as pd
from IPython.display import display

from djinn_nb.notebook import plots

# The repository root: the first folder upwards that has experiments/ and djinn_nb/. The experiment
# is the package `experiments` there, imported the way `python -m experiments...` runs it: with the
# root as the working directory.
repo = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "djinn_nb").is_dir() and (p / "experiments").is_dir())
os.chdir(repo)
run_exp3 = importlib.import_module("experiments.exp3_whitebox.run_exp3")
exp3 = repo / "experiments" / "exp3_whitebox"

out = Path(output_dir) if output_dir else repo / "experiments" / "out" / f"nb_exp3_{Path(config).stem}"
argv = ["--config", str(exp3 / "configs" / config), "--output-dir", str(out)]
argv += ["--device", device] + (["--model", model] if model else [])
argv += ["--skip-pytorch"] * bool(skip_pytorch) + ["--skip-vllm"] * bool(skip_vllm)
argv += ["--quiet"]  # progress goes to exp3.log in the output folder, not to this notebook's stderr
print("run_exp3", " ".join(argv))

# %% [markdown]
# ## Run the experiment
#
# About half a minute for the default config on two CPU cores.

# %%
rc = run_exp3.main(argv)
djinn = json.loads((out / run_exp3.DJINN_FILE).read_text())
comparative = json.loads((out / run_exp3.COMPARATIVE_FILE).read_text())
setup = djinn["setup"]
print("exit code", rc, "| errors:", djinn["errors"] or "none")
pd.Series({k: setup[k] for k in ("model", "num_layers", "device", "dtype", "breakpoint_layers",
                                 "breakpoint_steps", "prompt_len", "max_new_tokens")}, name="setup").to_frame()

# %% [markdown]
# ## Token accuracy per layer and trial
#
# Each trial pauses at the layer (at every generation step the config names) and resumes unmodified;
# token accuracy is the fraction of positions whose token equals the unpaused run's.

# %%
trials = pd.DataFrame(djinn["trials"])[["layer", "trial", "token_accuracy", "pauses", "overhead_pct"]]
display(plots.token_accuracy_table(trials))
plots.show(plots.plot_token_accuracy(trials))

# %% [markdown]
# ## Latency breakdown
#
# Per breakpoint layer, in milliseconds: **checkpoint** (median; from the block's output existing
# until the run is paused), then a fork through the client as means, which add up to its
# **total**: **restore** (copying the checkpoint and cache), **remaining layers** (the server
# executing the blocks after the breakpoint and the head) and **transport** (the rest of the round
# trip). For reference, *remaining layers alone* (median) is the same work done directly in plain
# PyTorch.

# %%
lat = pd.DataFrame([{
    "label": f"layer {b['layer']}",
    "checkpoint_ms": b["checkpoint_ms"]["median_ms"],
    "restore_ms": b["fork_client_parts_mean_ms"]["fork_copy_ms"],
    "remaining_ms": b["fork_client_parts_mean_ms"]["execute_ms"],
    "transport_ms": b["fork_client_parts_mean_ms"]["transport_ms"],
    "fork_client_ms": b["fork_client_parts_mean_ms"]["total_ms"],
    "remaining_layers_alone_ms": b["remaining_layers_alone_ms"]["median_ms"],
} for b in djinn["latency_breakdown"]])
display(lat.set_index("label").round(3))
plots.show(plots.plot_latency_breakdown(lat))

# %% [markdown]
# ## Steering demo (the study's single factor)

# %%
s = djinn["steering"]
pd.Series({k: s[k] for k in ("layer", "modification_type", "modification_factor", "output_changed",
                             "token_change_rate", "kl_next_token", "relative_logit_change",
                             "unmodified_text", "steered_text")}, name="steering").to_frame()

# %% [markdown]
# ## Steering effect over a range of factors
#
# The study tried one factor; here the same edit at the same layer, for several factors, measured
# through the client (`djinn_nb.notebook.metrics.steering_sweep`).

# %%
import djinn_nb
from djinn_nb.notebook.metrics import steering_sweep

client = djinn_nb.connect(address) if address else djinn_nb.connect(model=model, device=device)
prompt = setup["prompt_ids"]
sweep = steering_sweep(client, prompt, [s["layer"]], factors, max_new_tokens=setup["max_new_tokens"])
display(sweep[["factor", "token_change_rate", "kl", "logit_change", "text"]].round(4))
plots.show(plots.plot_steering_effect(sweep))

# %% [markdown]
# ## The comparative table
#
# djinn_nb beside the baselines and the study's own figures (last column).

# %%
pd.DataFrame(comparative["rows"], columns=comparative["columns"]).set_index("metric")

# %%
client.close()
assert rc == 0, f"run_exp3 reported a failure: {djinn['errors']}"
assert djinn["token_accuracy_all_100pct"], "token accuracy below 100 %"
