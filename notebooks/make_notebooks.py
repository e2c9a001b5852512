"""Write the three notebooks of this folder (without outputs) from the cells below.

    python notebooks/make_notebooks.py

Edit the cells here, not the .ipynb files, and commit both.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

CONNECT_PARAMS = '''# Parameters (papermill replaces this cell's values when it runs the notebook headless).
model = None      # None: the embedded default, SmolLM2-135M-Instruct; or "random:gpt2-tiny", a hub id, a directory
device = "cpu"    # where an embedded model runs: "cpu", "cuda:0"
address = None    # "host:port" of a running djinn-server; then model and device are the server's'''

FIND_REPO = '''from pathlib import Path

# The repository root: the first folder upwards that has experiments/ and djinn_nb/.
repo = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "djinn_nb").is_dir() and (p / "experiments").is_dir())'''


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str, tags: list[str] | None = None):
    cell = new_code_cell(text.strip())
    if tags:
        cell.metadata["tags"] = tags
    return cell


def quickstart():
    return [
        md("""
# djinn_nb quick start: pause a language model, look inside, steer it, resume

This notebook walks through one breakpoint session, top to bottom. Run the cells in order
(Shift+Enter). You need nothing but this notebook: by default the model runs inside this
kernel, on the CPU.

**What happens.** A language model generates text one token at a time. Each token comes out
of a stack of *decoder blocks* (layers); each block reads and rewrites a vector per token,
the *hidden state*. With djinn_nb you set a **breakpoint** after one block, run the model until it
**pauses** there, **inspect** the hidden state, **change** it (here: multiply it by a factor, which
is called *steering*), and **resume** to see how the generated text changes. The model, its weights
and its cache stay on a server (in this kernel, or on a GPU machine); the notebook only gets
small summaries and the tensors you ask for.

The first cell holds the parameters; change them if you like:
- `model`: `None` uses the embedded default, SmolLM2-135M-Instruct (30 layers, loads in seconds);
- `device`: `"cpu"` or a GPU such as `"cuda:0"`;
- `address`: `"host:port"` of a server you started with `djinn-server --port 5556`, instead of a model here.
"""),
        code(CONNECT_PARAMS + '''
prompt = "The capital of France is"
layer = 6             # the decoder block to pause after (0 is the first)
max_new_tokens = 12   # how many tokens to generate''', tags=["parameters"]),
        md("""
## 1. Load the extension

`%load_ext djinn_nb` adds the `%djinn_...` commands (*magics*) to this notebook. Every magic
explains itself: run, for example, `%djinn_break?` to read its help.
"""),
        code("%load_ext djinn_nb"),
        md("""
## 2. Connect

`%djinn_connect` with no address loads the model into a small server inside this kernel (the
first time this takes a few seconds). With `address=host:port` it reaches a running
`djinn-server` instead (that server has chosen the model and device). It returns a `Client`; showing it prints the model's facts, including its
number of layers: breakpoints can go after any layer from 0 to that number minus one.

`{address}`-style braces insert Python variables into a magic's line, here the parameters above
(a value of `None` counts as not given).
"""),
        code('''if address:  # a running djinn-server chose its model and device
    client = %djinn_connect {address}
else:
    client = %djinn_connect model={model} device={device}
client'''),
        md("""
## 3. Set a breakpoint

`%djinn_break layer=6` makes the next runs pause right after block 6 on the *prompt pass*
(generation step 0, when the model reads the whole prompt). `step=3` would pause at the third
new token instead, and `step=all` at every step. `%djinn_break` alone lists the breakpoints;
`%djinn_break clear` removes them.
"""),
        code("%djinn_break layer={layer}\n%djinn_break"),
        md("""
## 4. Run until the breakpoint

`%djinn_run` starts a generation from the prompt written after its options. It stops at the
first breakpoint and shows where it paused: the layer and step, the tokens generated so far (none
yet: we paused during the prompt pass), the shape and dtype of the paused hidden state, and how
many bytes the server holds for this run (its cache and checkpoint). `run = %djinn_run ...`
keeps the `Run` in a variable. A cell that starts with `%%djinn_run` takes the whole cell body
as the prompt, for long prompts.
"""),
        code('''run = %djinn_run max_new_tokens={max_new_tokens} {prompt}
run'''),
        md("""
## 5. Inspect the hidden state

`%djinn_inspect` fetches the paused hidden state and shows, for each position of the prompt, its
token and the norm, mean and largest value of its vector, with two plots: the norm per position
and a histogram of all the values. It returns an `Activation`; its `.tensor` is an ordinary
`torch.Tensor` of shape (batch, positions, hidden size) on this machine.
"""),
        code('''act = %djinn_inspect
act'''),
        code('''print("shape", tuple(act.tensor.shape), "norm", round(act.tensor.norm().item(), 3))
act.table().sort_values("norm", ascending=False).head(3)   # the positions with the largest vectors'''),
        md("""
## 6. Steer with a slider

`%djinn_steer` shows a slider over the *steering factor*: each time you release it at a value,
the paused run is **forked** (copied on the server, with its hidden state multiplied by the factor)
and the fork generates the rest of the text. The fork's text appears beside the unmodified one,
with the tokens that changed highlighted, and how long the fork took. The paused run itself is
not changed, so you can try as many factors as you like; forks you no longer see are freed.

The slider needs a live kernel (JupyterLab). When this notebook runs headless, the next cell
moves it from code instead: `w.set(v)` does what dragging to `v` does and waits for the result.
"""),
        code('''w = %djinn_steer min=0 max=2 step=0.05
w'''),
        code('''w.set(0.5).comparison      # the fork at factor 0.5 beside the unmodified continuation'''),
        md("""
## 7. Resume with a change

`%djinn_resume scale=0.9` multiplies the paused hidden state by 0.9 and lets the run continue to
its end (or to its next breakpoint). Because the state was changed, it first computes the
unmodified continuation too, and shows both with the differences highlighted. The returned `Run`
now holds the generated text.
"""),
        code('''run = %djinn_resume scale=0.9
run'''),
        md("""
## 8. The same in plain Python

The magics are a thin layer over the Python API, which scripts can use directly. Here the same
steps by hand: generate to the breakpoint, fetch the hidden state, fork from it with a modified
tensor, and resume the original unmodified. Scaling the tensor here gives exactly the tokens that
`%djinn_resume scale=0.9` gave above.
"""),
        code('''r = client.generate(prompt, max_new_tokens=max_new_tokens, breakpoints=[layer])
h = r.activation()                                   # torch.Tensor on this machine
steered = r.fork(activation=h * 0.9, breakpoints=[])  # a new run from the checkpoint; r stays paused
print("steered:   ", repr(steered.text))
print("unmodified:", repr(r.resume().text))
assert steered.token_ids == run.token_ids, "the fork should match %djinn_resume scale=0.9"'''),
        md("""
## 9. Runs on the server, and cleaning up

`%djinn_runs` lists this client's runs on the server with the memory each holds; any of them can
be picked up again with `run=ID` (in `%djinn_inspect`, `%djinn_resume`, `%djinn_steer`) or
`client.attach(ID)`. `close=all` frees them.
"""),
        code('''%djinn_runs'''),
        code('''w.close()
%djinn_runs close=all'''),
    ]


def steering():
    return [
        md("""
# Steering: how scaling one layer's hidden state changes the output

For a prompt, pause the model after a layer, then fork the paused run once per *scale factor*,
multiplying that layer's output by the factor, and compare each fork with the unmodified
continuation. Three measures, as in the steering literature:

- **token change rate**: the fraction of generated tokens that differ from the unmodified run;
- **KL divergence** of the next-token distribution at the edited step, KL(unmodified ‖ steered), in nats;
- **relative logit change**: ‖steered logits − unmodified logits‖ / ‖unmodified logits‖ at that step.

The sweep runs as a plain loop (`djinn_nb.metrics.steering_sweep`), so every table and figure here
is produced headless too; the interactive slider is at the end.
"""),
        code(CONNECT_PARAMS + '''
prompt = "The capital of France is"
layers = None       # None: the layers at 25 %, 50 % and 75 % of the model's depth
factors = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0]
max_new_tokens = 12''', tags=["parameters"]),
        code('''import pandas as pd
from IPython.display import display

import djinn_nb
from djinn_nb import plots
from djinn_nb.metrics import steering_sweep

client = djinn_nb.connect(address) if address else djinn_nb.connect(model=model, device=device)
n = client.info["num_layers"]
layers = layers or sorted({round(n * f) for f in (0.25, 0.5, 0.75)})
if not client.info["has_tokenizer"]:          # random models take token ids
    prompt = list(range(1, 9))
print(client, "layers", layers)'''),
        md("## The sweep\n\nOne row per (layer, factor); factor 1.0 is the unmodified run, so its row is all zeros."),
        code('''sweep = steering_sweep(client, prompt, layers, factors, max_new_tokens=max_new_tokens)
sweep[["layer", "factor", "token_change_rate", "kl", "logit_change", "fork_ms"]].round(4)'''),
        md("## Effect against the factor"),
        code('''plots.show(plots.plot_steering_effect(sweep))'''),
        md("## What the model says at each factor\n\nThe continuation of each fork, for the middle layer."),
        code('''mid = layers[len(layers) // 2]
pd.set_option("display.max_colwidth", 80)
sweep[sweep.layer == mid][["factor", "token_change_rate", "text"]]'''),
        md("""
## Where a fork's time goes

Each fork's client wall time splits into the server's own time (copying the checkpoint and
running the layers after the breakpoint and the rest of generation) and the transport (RPC and
serialisation). Deeper layers leave fewer layers to rerun.
"""),
        code('''lat = pd.DataFrame({
    "label": [f"layer {l}" for l in sweep.layer],
    "remaining_ms": sweep.server_ms,
    "transport_ms": sweep.transport_ms,
})
display(plots.latency_breakdown_table(lat))
plots.show(plots.plot_latency_breakdown(lat))'''),
        md("""
## The slider (live kernel)

The same experiment by hand: a paused run at the middle layer and a slider over the factor. In
JupyterLab, drag it; headless, the loop below moves it from code and shows each result.
"""),
        code('''from djinn_nb.widgets import SteeringWidget

run = client.generate(prompt, max_new_tokens=max_new_tokens, breakpoints=[mid])
w = SteeringWidget(client, run, min=0, max=2, step=0.05)
w'''),
        code('''for v in (0.5, 1.5):
    display(w.set(v).comparison)'''),
        code('''w.close()
run.close()
assert client.runs() == [], "every run and fork of this notebook is closed"'''),
    ]


def reproduce_exp3():
    return [
        md("""
# Reproducing experiment 3: white-box breakpoint debugging

This notebook runs the experiment in `experiments/exp3_whitebox/` (see its README) and draws its
tables and figures from the result files it writes:

1. **token accuracy** of paused-and-resumed generation against the unpaused one, per breakpoint
   layer and trial (the study reports 100 %);
2. the **latency breakdown** of a pause and a restore: checkpoint capture, restoring the
   checkpoint (fork copy), the remaining layers, and transport;
3. the **steering** demo (one factor) and, beyond the study, the steering effect over a range
   of factors;
4. the study's comparative table.

The experiment loads its model in this kernel (`address` is not used by it; the factor sweep
at the end uses it when given).
"""),
        code(CONNECT_PARAMS + '''
config = "cpu_default.yaml"   # a file in experiments/exp3_whitebox/configs/
output_dir = None             # None: a folder under experiments/out/
skip_pytorch = False          # skip the plain-PyTorch baseline
skip_vllm = False             # skip the vLLM baseline (recorded as "not run" where vLLM is absent)
factors = [0.0, 0.5, 0.8, 0.9, 1.0, 1.1, 1.2, 1.5, 2.0]''', tags=["parameters"]),
        code(FIND_REPO + '''
import json
import sys

import pandas as pd
from IPython.display import display

from djinn_nb import plots

exp3 = repo / "experiments" / "exp3_whitebox"
sys.path.insert(0, str(exp3))
import run_exp3  # noqa: E402

out = Path(output_dir) if output_dir else repo / "experiments" / "out" / f"nb_exp3_{Path(config).stem}"
argv = ["--config", str(exp3 / "configs" / config), "--output-dir", str(out)]
argv += ["--device", device] + (["--model", model] if model else [])
argv += ["--skip-pytorch"] * bool(skip_pytorch) + ["--skip-vllm"] * bool(skip_vllm)
print("run_exp3", " ".join(argv))'''),
        md("## Run the experiment\n\nAbout half a minute for the default config on two CPU cores."),
        code('''rc = run_exp3.main(argv)
djinn = json.loads((out / run_exp3.DJINN_FILE).read_text())
comparative = json.loads((out / run_exp3.COMPARATIVE_FILE).read_text())
setup = djinn["setup"]
print("exit code", rc, "| errors:", djinn["errors"] or "none")
pd.Series({k: setup[k] for k in ("model", "num_layers", "device", "dtype", "breakpoint_layers",
                                 "breakpoint_steps", "prompt_len", "max_new_tokens")}, name="setup").to_frame()'''),
        md("""
## Token accuracy per layer and trial

Each trial pauses at the layer (at every generation step the config names) and resumes unmodified;
token accuracy is the fraction of positions whose token equals the unpaused run's.
"""),
        code('''trials = pd.DataFrame(djinn["trials"])[["layer", "trial", "token_accuracy", "pauses", "overhead_pct"]]
display(plots.token_accuracy_table(trials))
plots.show(plots.plot_token_accuracy(trials))'''),
        md("""
## Latency breakdown

Per breakpoint layer, medians in milliseconds: **checkpoint** (from the block's output existing
until the run is paused), **restore** (copying the checkpoint and cache for a fork), **remaining
layers** (the server executing the blocks after the breakpoint and the head), **transport** (client
round trip minus the server's time). For reference, *remaining layers alone* is the same work done
directly in plain PyTorch.
"""),
        code('''lat = pd.DataFrame([{
    "label": f"layer {b['layer']}",
    "checkpoint_ms": b["checkpoint_ms"]["median_ms"],
    "restore_ms": b["fork_client_server_parts_ms"]["fork_copy_ms"],
    "remaining_ms": b["fork_client_server_parts_ms"]["execute_ms"],
    "transport_ms": b["transport_ms"],
    "fork_client_ms": b["fork_client_ms"]["median_ms"],
    "remaining_layers_alone_ms": b["remaining_layers_alone_ms"]["median_ms"],
} for b in djinn["latency_breakdown"]])
display(lat.set_index("label").round(3))
plots.show(plots.plot_latency_breakdown(lat))'''),
        md("## Steering demo (the study's single factor)"),
        code('''s = djinn["steering"]
pd.Series({k: s[k] for k in ("layer", "modification_type", "modification_factor", "output_changed",
                             "token_change_rate", "kl_next_token", "relative_logit_change",
                             "unmodified_text", "steered_text")}, name="steering").to_frame()'''),
        md("""
## Steering effect over a range of factors

The study tried one factor; here the same edit at the same layer, for several factors, measured
through the client (`djinn_nb.metrics.steering_sweep`).
"""),
        code('''import djinn_nb
from djinn_nb.metrics import steering_sweep

client = djinn_nb.connect(address) if address else djinn_nb.connect(model=model, device=device)
prompt = setup["prompt_ids"]
sweep = steering_sweep(client, prompt, [s["layer"]], factors, max_new_tokens=setup["max_new_tokens"])
display(sweep[["factor", "token_change_rate", "kl", "logit_change", "text"]].round(4))
plots.show(plots.plot_steering_effect(sweep))'''),
        md("## The comparative table\n\ndjinn_nb beside the baselines and the study's own figures (last column)."),
        code('''pd.DataFrame(comparative["rows"], columns=comparative["columns"]).set_index("metric")'''),
        code('''client.close()
assert rc == 0, f"run_exp3 reported a failure: {djinn['errors']}"
assert djinn["token_accuracy_all_100pct"], "token accuracy below 100 %"'''),
    ]


def write(name: str, cells: list) -> Path:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    path = HERE / name
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return path


NOTEBOOKS = {
    "01_quickstart.ipynb": quickstart,
    "02_steering.ipynb": steering,
    "03_reproduce_exp3.ipynb": reproduce_exp3,
}

if __name__ == "__main__":
    for name, cells in NOTEBOOKS.items():
        print(write(name, cells()))
