"""IPython magics: ``%load_ext djinn_nb`` registers ``%djinn_connect``, ``%djinn_break``,
``%djinn_run``/``%%djinn_run``, ``%djinn_inspect``, ``%djinn_resume``, ``%djinn_steer``,
``%djinn_lens``, ``%djinn_attention`` and ``%djinn_runs`` (and, from ``debug_magics``,
``%djinn_next_layer``, ``%djinn_next_step``, ``%djinn_rewind``, ``%djinn_history``).

The magics parse their arguments and call the client API (:mod:`djinn_nb.client`);
nothing else. A user's mistake, and any error the server reports, is raised as
IPython's ``UsageError``: one line, no traceback.
"""
from __future__ import annotations

import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class

from . import magic_args as A
from . import messages as M
from ..conditions import parse as parse_condition
from ..client import Client, Run, connect
from .display import RESIDUAL_SITES, Activation, Attention, BreakpointList, Comparison, LensGrid, RunsTable, decode_text, token_strings
from ..errors import DjinnError
from .usage import one_line, usage_errors

__all__ = ["DjinnMagics", "register"]

_CONNECT_HINT = "run %djinn_connect first (no address: the embedded default model)"
_RUN_HINT = M.BREAK_HINT


_one_line = one_line
_usage_errors = usage_errors


@magics_class
class DjinnMagics(Magics):
    """The magics' state: the client, the breakpoints for the next runs and the current run."""

    def __init__(self, shell: Any):
        super().__init__(shell)
        self.client: Client | None = None
        self.breakpoints: list[dict[str, Any]] = []
        self.run: Run | None = None
        self.widgets: list[Any] = []
        self._baselines: dict[str, list[int]] = {}  # run id -> its unmodified continuation

    # ----- helpers ----------------------------------------------------------------
    def _client(self) -> Client:
        if self.client is None:
            raise UsageError(f"not connected: {_CONNECT_HINT}")
        return self.client

    def _target(self, run_id: str | None) -> Run:
        """The run named by ``run=`` (re-attached), else the current one."""
        client = self._client()
        if run_id is not None:
            return client.attach(run_id)
        if self.run is None:
            raise UsageError(f"no run yet: {_RUN_HINT}")
        return self.run

    def _paused(self, run_id: str | None) -> Run:
        run = self._target(run_id)
        if not run.paused:
            raise UsageError(M.not_paused_hint(run, self.breakpoints))
        return run

    @staticmethod
    def _layer(run: Run) -> int:
        """The layer of a run :meth:`_paused` returned."""
        if run.layer is None:
            raise UsageError(f"run {run.id} is paused at no layer")
        return run.layer

    def _check_layer(self, layer: int) -> int:
        n = self._client().info["num_layers"]
        if not 0 <= layer < n:
            raise UsageError(f"layer {layer} is out of range: this model has layers 0..{n - 1}; use layer=0..{n - 1}")
        return layer

    def _prompt_ids(self, run: Run) -> list[int] | None:
        """The run's prompt token ids: the run knows them (no call, no tokenizing again)."""
        return run.prompt_ids or None

    def _position_tokens(self, run: Run) -> list[str] | None:
        """The text of each position of the paused activation."""
        if run.step > 0:
            return token_strings(self._client(), run.token_ids[-1:])
        ids = self._prompt_ids(run)
        return token_strings(self._client(), ids) if ids else None

    def _check_site(self, site: str, allowed: Any = None, why: str = "unknown site") -> str:
        sites = [x for x in self._client().info.get("sites", ["resid_post"]) if allowed is None or x in allowed]
        if site not in sites:
            raise UsageError(f"{why} {site!r}: use site= one of {', '.join(sites)}")
        return site

    def _check_heads(self, run: Run, heads: list[int] | None, edit: dict[str, Any]) -> list[int] | None:
        """``heads=`` restricts scale/add to attention heads, so the run must be paused at site z."""
        if heads is None:
            return None
        if run.site != "z":
            raise UsageError(f"heads= edits attention heads at site z; run {run.id} is paused at {run.site}: "
                             f"%djinn_break layer={run.layer} site=z")
        if not {"scale", "add"} & set(edit):
            raise UsageError("heads= restricts scale= or add= to those heads: e.g. heads=1,3 scale=0")
        n = self._client().info.get("num_heads")
        if n is not None and any(h >= n for h in heads):
            raise UsageError(f"heads={','.join(map(str, heads))}: this model has heads 0..{n - 1}")
        return heads

    def _token_text(self, ids: list[int], cache: dict[int, str]) -> list[str]:
        missing = [i for i in dict.fromkeys(ids) if i not in cache]
        cache.update(zip(missing, token_strings(self._client(), missing)))
        return [cache[i] for i in ids]

    def _tensor_arg(self, name: str, key: str) -> Any:
        import torch

        shell = self.shell
        assert shell is not None, "a magic registered with IPython has its shell"
        if name not in shell.user_ns:
            raise UsageError(f"{key}={name}: no variable {name!r} in the notebook; assign a tensor to it first")
        value = shell.user_ns[name]
        if not isinstance(value, torch.Tensor):
            raise UsageError(f"{key}={name}: {name} is a {type(value).__name__}, not a torch.Tensor")
        return value

    def _generate(self, prompt: str | list[int], breakpoints: list[Any], **kw: Any) -> Run:
        """Start a run (it knows its prompt's token ids: ``run.prompt_ids``)."""
        return self._client().generate(prompt, breakpoints=breakpoints or None, **kw)

    def _start(self, prompt: str | list[int], **kw: Any) -> Run:
        self.run = self._generate(prompt, list(self.breakpoints), **kw)
        return self.run

    # ----- magics -----------------------------------------------------------------
    @line_magic
    @_usage_errors
    def djinn_connect(self, line: str = "") -> Client:
        """Connect to a djinn server; returns the Client.

        %djinn_connect [address] [model=...] [device=cpu] [dtype=...] [token=...]

        With no address, the model (default: the embedded SmolLM2-135M-Instruct)
        is loaded into a server inside this kernel. With an address
        (``host:port`` or ``address=host:port``), reaches a running djinn-server;
        the server has chosen its model. Example: ``client = %djinn_connect model=random:gpt2-tiny``
        """
        spec = dict(address=A.text, model=A.text, device=A.text, dtype=A.text, token=A.text)
        p = A.parse(line, spec, "djinn_connect", anywhere=True)
        address = p.options.pop("address", None)
        if p.rest:
            if address is not None or len(p.rest.split()) != 1:
                raise UsageError(f"%djinn_connect takes one address (host:port), got {p.rest!r}")
            address = p.rest
        if address is not None and "model" in p.options:
            raise UsageError("pass an address or model=..., not both: a running server has chosen its model")
        if address is None:
            print(M.loading_line(p.options.get("model"), p.options.get("device")), flush=True)
        t0 = time.perf_counter()
        try:
            client = connect(address, **p.options)
        except DjinnError:
            raise
        except (ConnectionError, TimeoutError, OSError) as e:
            where = f"a djinn server at {address}" if address else f"model {p.options.get('model', 'embedded')!r}"
            raise UsageError(
                f"could not reach {where}: {_one_line(e)}; check the address/model (start a server with djinn-server --port 5556)"
            ) from None
        for widget in self.widgets:
            widget.close()
        if self.client is not None:
            self.client.close()
        self.client, self.run, self.widgets = client, None, []
        self._baselines.clear()
        n = client.info["num_layers"]
        self.breakpoints = [b for b in self.breakpoints if b["layer"] < n]
        print(f"connected to {client.info.get('model')} ({n} layers) in {time.perf_counter() - t0:.1f} s")
        return client

    @line_magic
    @_usage_errors
    def djinn_break(self, line: str = "") -> BreakpointList | None:
        """Add a breakpoint for the next runs, list them, or clear them.

        %djinn_break layer=6 [step=0|all] [site=resid_post] [when="top1_prob < 0.3"]
                                            pause in decoder block 6 (step 0: the prompt pass,
                                            k: the k-th decoding step, all: every step) at a site:
                                            resid_pre (the block's input), z (each head's attention
                                            output), attn_out, resid_mid, mlp_out, resid_post (its output);
                                            when=: only at steps whose output meets the condition
                                            (top1_prob, entropy, token, norm, step; < <= > >= == != in
                                            and or not), tested on the server
        %djinn_break                        returns the breakpoints (a list of dicts, shown as a sentence)
        %djinn_break clear                  removes them all
        """
        p = A.parse(line, dict(layer=A.integer, step=A.step_value, site=A.text, when=A.text), "djinn_break",
                    anywhere=True)
        if p.rest == "clear" and not p.options:
            self.breakpoints = []
            print("breakpoints cleared")
            return None
        if p.rest:
            if "layer" in p.options or not p.rest.lstrip("-").isdigit():
                raise UsageError(f"%djinn_break takes layer=N [step=K|all] [site=...], 'clear', or nothing (got {p.rest!r})")
            p.options["layer"] = int(p.rest)
        if "layer" not in p.options:
            if p.options:
                raise UsageError("a breakpoint needs a layer: write %djinn_break layer=6 step=...")
            return BreakpointList(self.breakpoints)
        bp = {"layer": self._check_layer(p.options["layer"]), "step": p.options.get("step", 0),
              "site": self._check_site(p.options.get("site", "resid_post"))}
        if "when" in p.options:
            parse_condition(p.options["when"])  # a mistake shows here, before any run starts
            bp["when"] = p.options["when"]
        if bp not in self.breakpoints:
            self.breakpoints.append(bp)
        print(repr(BreakpointList(self.breakpoints)))
        return None

    @line_cell_magic
    @_usage_errors
    def djinn_run(self, line: str = "", cell: str | None = None) -> Run:
        """Start a run with the breakpoints of %djinn_break; returns the Run, paused at the first one (or done).

        %djinn_run [max_new_tokens=16] [temperature=0] [top_k=0] [seed=0] [record_logits=false] <prompt>

        %%djinn_run [max_new_tokens=...]
        <prompt: the whole cell body>

        A prompt written as [1, 2, 3] is a list of token ids (for models without a tokenizer).
        Example: ``r = %djinn_run max_new_tokens=20 The capital of France is``
        """
        spec = dict(max_new_tokens=A.integer, temperature=A.number, top_k=A.integer, seed=A.integer,
                    record_logits=A.flag)
        p = A.parse(line, spec, "djinn_run")
        if cell is not None:
            if p.rest:
                raise UsageError("%%djinn_run takes key=value words on its line and the prompt in the cell body")
            prompt = A.parse_prompt(cell, "%djinn_run")
        else:
            prompt = A.parse_prompt(p.rest)
        run = self._start(prompt, **p.options)
        print(M.run_line(run))  # `r = %djinn_run ...` shows nothing else
        return run

    @line_magic
    @_usage_errors
    def djinn_inspect(self, line: str = "") -> Activation:
        """The paused activation: per-position norm/mean/max with the tokens, the logit lens, and a plot.

        %djinn_inspect [run=r3] [plot=true] [lens=5]

        At a residual-stream site (resid_pre, resid_mid, resid_post) the table also shows the
        logit lens: each position's top ``lens`` tokens (0: none) with their probabilities.
        Returns an Activation (``.tensor`` is the tensor on this machine, ``.table()`` a DataFrame,
        ``.lens`` what ``run.lens(k)`` returned).
        """
        p = A.parse(line, dict(run=A.text, plot=A.flag, lens=A.integer), "djinn_inspect", anywhere=True)
        if p.rest:
            raise UsageError(f"%djinn_inspect takes run=ID, plot=true|false and lens=K, not {p.rest!r}")
        run = self._paused(p.options.get("run"))
        k = p.options.get("lens", 5)
        site = run.site or "resid_post"
        lens = run.lens(k) if k > 0 and site in RESIDUAL_SITES else None  # its reply has the positions' texts too
        act = Activation(run.id, self._layer(run), run.step, run.activation(), run.activation_stats or {},
                         self._position_tokens(run) or [], site)
        if lens is not None:
            act.lens, cache = lens, dict[int, str]()
            act.lens_tokens = [list(zip(self._token_text([i for i, _ in e], cache), [q for _, q in e]))
                               for e in act.lens]
        elif k > 0:
            act.lens_note = (f"no logit lens at {act.site}: the lens reads the residual stream "
                             f"({', '.join(RESIDUAL_SITES)}); pause at one, e.g. %djinn_break layer={run.layer} site=resid_mid")
        if p.options.get("plot", True):
            from .plots import plot_activation, show

            show(plot_activation(act.tensor, act.tokens, f"run {run.id}: {act.site} of layer {run.layer}, step {run.step}"))
        return act

    @line_magic
    @_usage_errors
    def djinn_resume(self, line: str = "") -> Run:
        """Continue the paused run to its next breakpoint or end; returns the Run.

        %djinn_resume [scale=0.9] [add=VAR] [activation=VAR] [heads=1,3] [patch_from=r2 [positions=3,4]]
                      [compare=true] [run=r3]

        scale multiplies the paused activation; add=VAR adds the tensor in variable VAR
        (shape (hidden,) or the activation's); activation=VAR replaces it. At site z, heads=1,3
        restricts scale/add to those attention heads (heads=3 scale=0 ablates head 3). patch_from=r2
        writes run r2's activation (paused at the same layer, step and site) at positions (all if
        not given), on the server. With an edit,
        the unmodified continuation is computed first (a fork) and, once the run is done,
        shown beside the edited one with the changed tokens highlighted (compare=false skips it).
        """
        spec = dict(scale=A.number, add=A.text, activation=A.text, heads=A.int_list, compare=A.flag, run=A.text,
                    patch_from=A.text, positions=A.int_list)
        p = A.parse(line, spec, "djinn_resume", anywhere=True)
        if p.rest:
            raise UsageError(f"%djinn_resume takes key=value words such as scale=0.9, not {p.rest!r}")
        run = self._paused(p.options.get("run"))
        edit: dict[str, Any] = {k: self._tensor_arg(p.options[k], k) for k in ("add", "activation") if k in p.options}
        if "scale" in p.options:
            edit["scale"] = p.options["scale"]
        if "positions" in p.options and "patch_from" not in p.options:
            raise UsageError("positions= says where patch_from= writes: add patch_from=<run id>")
        edit.update({k: p.options[k] for k in ("patch_from", "positions") if k in p.options})
        heads = self._check_heads(run, p.options.get("heads"), edit)
        if heads is not None:
            edit["heads"] = heads
        if edit and p.options.get("compare", True) and run.id not in self._baselines:
            base = run.fork(breakpoints=[], original=True, close=True)  # closed in the same call
            self._baselines[run.id] = base.token_ids
        run.resume(**edit)
        self.run = run
        for widget in self.widgets:  # a slider on this run has no checkpoint left once it moved on
            if getattr(widget, "run", None) is not None and widget.run.id == run.id:
                if widget.run is not run:
                    widget.run.refresh()
                widget.check()
        baseline = self._baselines.get(run.id)
        if run.done and baseline is not None:
            from IPython.display import display

            client = self._client()
            prompt = self._prompt_ids(run)
            try:  # every text the comparison shows, in one call (none if all are known)
                client.decode_many([prompt] if prompt else [], baseline + run.token_ids)
            except DjinnError:
                pass  # no tokenizer: ids instead
            display(Comparison(baseline, token_strings(client, baseline), run.token_ids,
                               token_strings(client, run.token_ids), "edited run",
                               prompt=decode_text(client, prompt) if prompt else None))
        elif not run.done or baseline is None:
            print(M.run_line(run))
        return run

    @line_magic
    @_usage_errors
    def djinn_steer(self, line: str = "") -> Any:
        """A slider over the steering factor: each change forks the paused run with its activation scaled.

        %djinn_steer [layer=N] [min=0] [max=2] [step=0.05] [value=1] [heads=1,3] [run=r3] [prompt]

        Shows the fork's continuation beside the unmodified one, changed tokens highlighted,
        with the fork's latency. layer=N different from the paused run's layer starts a new
        run paused at N (same prompt; or the prompt given after the options; at site z with heads=).
        heads=1,3 (at site z) scales only those attention heads.
        Returns the SteeringWidget (``w.set(0.5)`` moves it from code and waits).
        """
        spec = dict(layer=A.integer, min=A.number, max=A.number, step=A.number, value=A.number, heads=A.int_list,
                    run=A.text)
        p = A.parse(line, spec, "djinn_steer")
        o = p.options
        lo, hi, step = o.get("min", 0.0), o.get("max", 2.0), o.get("step", 0.05)
        value = o.get("value", min(max(1.0, lo), hi))
        if not lo < hi:
            raise UsageError(f"min must be below max (got min={lo} max={hi}); e.g. min=0 max=2")
        if not 0 < step <= hi - lo:
            raise UsageError(f"step must be > 0 and at most max-min (got step={step}); e.g. step=0.05")
        if not lo <= value <= hi:
            raise UsageError(f"value={value} is outside min..max ({lo}..{hi}); pick a value between them")
        heads = o.get("heads")
        run = self._steer_run(o.get("layer"), o.get("run"), p.rest, "z" if heads is not None else None)
        self._check_heads(run, heads, {"scale": value})
        from .widgets import SteeringWidget

        widget = SteeringWidget(self._client(), run, min=lo, max=hi, step=step, value=value, heads=heads)
        self.widgets.append(widget)
        return widget

    def _steer_run(self, layer: int | None, run_id: str | None, prompt_text: str, site: str | None = None) -> Run:
        """The paused run to steer: the current one, or a new one paused at ``layer`` (at ``site``)."""
        if layer is None:
            if prompt_text:
                raise UsageError("a prompt for %djinn_steer needs layer=N: write %djinn_steer layer=6 <prompt>")
            return self._paused(run_id)
        self._check_layer(layer)
        if prompt_text:
            prompt, max_new = A.parse_prompt(prompt_text, "djinn_steer layer=6"), 16
        else:
            current = self._target(run_id)
            if current.paused and current.layer == layer and site in (None, current.site):
                return current
            ids = self._prompt_ids(current)
            if ids is None:
                raise UsageError(f"the prompt of run {current.id} is unknown here: give it, %djinn_steer layer={layer} <prompt>")
            prompt, max_new = ids, current.max_new_tokens
        # the slider's hover alternatives are the server's top-k of each step: no logits recorded
        run = self._generate(prompt, [{"layer": layer, "step": 0, "site": site or "resid_post"}], max_new_tokens=max_new)
        if not run.paused:
            raise UsageError(f"run {run.id} ended before layer {layer}; give more max_new_tokens")
        return run

    @line_magic
    @_usage_errors
    def djinn_lens(self, line: str = "") -> LensGrid:
        """The logit lens at every layer for one prompt pass, as a heatmap (layers × positions,
        colour = top-1 probability, each cell labelled with its top token).

        %djinn_lens [k=1] [site=resid_post] [run=r3] [plot=true] [prompt]

        With no prompt, the current run's (or run=ID's) prompt. site= is a residual-stream site
        (resid_pre, resid_mid, resid_post). Returns a LensGrid (``.ids``/``.probs`` (layers, positions, k),
        ``.table()`` the top tokens as a DataFrame, ``.plot()`` the figure).
        """
        spec = dict(k=A.integer, site=A.text, run=A.text, plot=A.flag)
        p = A.parse(line, spec, "djinn_lens")
        site = self._check_site(p.options.get("site", "resid_post"), RESIDUAL_SITES,
                                "the lens reads the residual stream, not site")
        client = self._client()
        if p.rest:
            prompt = A.parse_prompt(p.rest, "djinn_lens")
            ids = client.tokenize(prompt) if isinstance(prompt, str) else prompt
        else:
            ids = self._target(p.options.get("run")).prompt_ids
        grid = client.lens_grid(ids, k=p.options.get("k", 1), site=site)
        cache: dict[int, str] = {}
        top = [self._token_text(row, cache) for row in grid["ids"][..., 0].tolist()]
        lens = LensGrid(grid["ids"], grid["probs"], self._token_text(list(ids), cache), top, site)
        if p.options.get("plot", True):
            from .plots import show

            show(lens.plot())
        return lens

    @line_magic
    @_usage_errors
    def djinn_attention(self, line: str = "") -> Attention:
        """The paused block's attention pattern: one heatmap per head, tokens on both axes.

        %djinn_attention [head=3] [run=r3] [widget=true]

        Rows are the query positions (at a decoding step, the one new token), columns the keys.
        head= shows one head. In a Jupyter kernel with ipywidgets, a head selector sits above the
        figure (widget=false: the figure only). Returns an Attention (``.tensor`` is ``run.attention()``,
        (batch, heads, queries, keys); ``.plot(head)`` the figure).
        """
        p = A.parse(line, dict(head=A.integer, run=A.text, widget=A.flag), "djinn_attention", anywhere=True)
        if p.rest:
            raise UsageError(f"%djinn_attention takes head=H, run=ID and widget=true|false, not {p.rest!r}")
        run = self._paused(p.options.get("run"))
        tensor = run.attention()
        head, n = p.options.get("head"), int(tensor.shape[1])
        if head is not None and not 0 <= head < n:
            raise UsageError(f"head={head}: this model has heads 0..{n - 1}")
        ids = run.prompt_ids + run.token_ids
        keys = self._token_text(ids, {}) if len(ids) == tensor.shape[-1] else None
        att = Attention(run.id, self._layer(run), run.step, tensor, keys)
        live = getattr(self.shell, "kernel", None) is not None
        if live and p.options.get("widget", True):
            from .widgets import AttentionWidget

            self.widgets.append(AttentionWidget(att, head).show())
        else:
            from .plots import show

            show(att.plot(head))
        return att

    @line_magic
    @_usage_errors
    def djinn_runs(self, line: str = "") -> RunsTable:
        """This client's runs on the server (id, state, layer, step, tokens, bytes held) as a table
        (the rows of ``client.runs()``; ``.frame()`` is a DataFrame of the raw values).

        %djinn_runs [close=r3|all]

        Any of them can be picked up again: run=ID in %djinn_inspect/%djinn_resume/%djinn_steer,
        or client.attach(ID). close=ID frees one run's server memory, close=all every run.
        """
        p = A.parse(line, dict(close=A.text), "djinn_runs", anywhere=True)
        if p.rest:
            raise UsageError(f"%djinn_runs takes close=ID|all, not {p.rest!r}")
        client = self._client()
        target = p.options.get("close")
        if target is not None:
            ids = [r["id"] for r in client.runs()] if target == "all" else [target]
            for run_id in ids:
                client.attach(run_id).close()
                self._baselines.pop(run_id, None)
                if self.run is not None and self.run.id == run_id:
                    self.run = None
        return RunsTable(client.runs())


def register(ipython: Any) -> DjinnMagics:
    """Register the djinn magics with an IPython shell (``%load_ext djinn_nb`` calls this)."""
    from .branches import BranchMagics
    from .debug_magics import NavigationMagics
    from .formatters import register as show_as_html

    ipython.register_magics(magics := DjinnMagics(ipython))
    for more in (NavigationMagics, BranchMagics):  # the stepping and the branches' magics share its run
        ipython.register_magics(more(ipython, magics))
    show_as_html(ipython)
    return magics
