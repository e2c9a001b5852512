"""The engine: generations that pause at decoder blocks, on the model's device.

A run is a greedy (or seeded sampling) generation with a KV cache. Each step
calls the model's own forward; when the step has a breakpoint, a hook on that
block records the block's arguments and output and stops the forward there
(``_Pause``). The run is then *paused*: its cache, checkpoint and tokens stay
on the device and the call returns. Resuming runs the remaining blocks by hand
with the recorded arguments, then the final norm and the head; the split is
checked bit-for-bit against the model's own forward at load time
(:func:`architecture.check_split_is_exact`), which is what makes a paused and
resumed run give exactly the tokens of an unpaused one.

A fork copies the checkpoint and the cache (sharing tensors, see
:mod:`kvcache`) and continues from the layer after the breakpoint, so the
layers before it are never recomputed.

One run executes on the device at a time (``Engine._device_lock``); a paused
run holds no lock. This module knows nothing of rpyc or notebooks.
"""
from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from . import graphs, kvcache, offload
from .runs import Checkpoint, Run, RunState, activation_stats, map_run_tensors, run_tensors
from .specs import ALL_STEPS, Breakpoint, Edit, Sampling, finite_number, parse_breakpoint, parse_breakpoints
from .architecture import Anatomy, block_output, check_split_is_exact, find_anatomy, run_tail
from ..errors import (
    ActivationError,
    BadRequestError,
    ExecutionError,
    NoTokenizerError,
    RunStateError,
    UnknownRunError,
)

log = logging.getLogger("djinn_nb.core.engine")
TOP_K = 5

__all__ = [
    "ALL_STEPS", "Breakpoint", "Checkpoint", "Edit", "Engine", "Run", "RunState", "Sampling",
    "activation_stats", "map_run_tensors", "parse_breakpoint", "parse_breakpoints", "run_tensors",
]


class _Pause(Exception):
    """Raised inside a forward hook to stop the model's forward after a block."""

    def __init__(self, layer: int, hidden: torch.Tensor, args: tuple, kwargs: dict, capture_s: float = 0.0):
        super().__init__(layer)
        self.layer, self.hidden, self.args, self.kwargs = layer, hidden, args, kwargs
        self.capture_s = capture_s


class Engine:
    """A loaded causal LM plus its runs. Thread-safe; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        name: str = "model",
        check_exact: bool = True,
        cuda_graphs: bool | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.anatomy: Anatomy = find_anatomy(model)
        self.device = self.anatomy.lm_head.weight.device
        self.dtype = self.anatomy.lm_head.weight.dtype
        self._device_lock = threading.Lock()
        self._runs: dict[str, Run] = {}
        self._runs_lock = threading.Lock()
        self._ids = itertools.count(1)
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        self.eos_ids: frozenset[int] = frozenset(
            [eos] if isinstance(eos, int) else (eos or [])
        )
        self._parameters = sum(p.numel() for p in model.parameters())
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("DJINN_CUDA_GRAPHS", "1") != "0"
        devices = {p.device for p in model.parameters()}
        # One device only: a graph of a model split over GPUs would span several streams.
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda" and len(devices) == 1
        cfg = model.config
        self.max_positions: int | None = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.ignored_generation_config = _ignored_generation_settings(model)
        if self.ignored_generation_config:
            log.warning(
                "%s: its generation_config sets %s, which djinn_nb does not apply (greedy is plain argmax)",
                name, ", ".join(self.ignored_generation_config),
            )
        if check_exact:
            check_split_is_exact(model, self.anatomy, self._probe_split)

    # ----- facts ------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.anatomy.num_layers

    def info(self) -> dict[str, Any]:
        cfg = self.model.config
        return {
            "model": self.name,
            "architecture": type(self.model).__name__,
            "num_layers": self.num_layers,
            "hidden_size": int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0))),
            "vocab_size": int(getattr(cfg, "vocab_size", 0)),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "has_tokenizer": self.tokenizer is not None,
            "block_path": self.anatomy.block_path,
            "parameters": self._parameters,
            "max_positions": self.max_positions,
            "generation_config_ignored": list(self.ignored_generation_config),
        }

    # ----- tokens -----------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise NoTokenizerError(
                    f"{self.name} has no tokenizer: pass the prompt as a list of token ids"
                )
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = list(prompt)
        vocab = int(getattr(self.model.config, "vocab_size", 0)) or None
        if not ids:
            raise BadRequestError("the prompt is empty")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab and t >= vocab):
                raise BadRequestError(f"token id {t!r} is not an integer in 0..{(vocab or 0) - 1}")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise NoTokenizerError(f"{self.name} has no tokenizer to decode with")
        return self.tokenizer.decode(list(ids))

    # ----- registry ---------------------------------------------------------------
    def get(self, run_id: str, owner: str = "") -> Run:
        with self._runs_lock:
            run = self._runs.get(run_id)
        if run is None or run.owner != owner:
            raise UnknownRunError(f"no run {run_id!r} (closed, expired, or another client's)")
        run.last_used = time.monotonic()
        return run

    def runs(self, owner: str = "") -> list[Run]:
        with self._runs_lock:
            return [r for r in self._runs.values() if r.owner == owner]

    def all_runs(self) -> list[Run]:
        with self._runs_lock:
            return list(self._runs.values())

    def _register(self, run: Run) -> None:
        with self._runs_lock:
            self._runs[run.id] = run

    def _new_id(self) -> str:
        """``r<n>-<random>``: ordered for people, unguessable for other clients."""
        return f"r{next(self._ids)}-{secrets.token_hex(4)}"

    def close(self, run_id: str, owner: str = "") -> None:
        """Free a run's device memory now; closing twice is an error (unknown run)."""
        run = self.get(run_id, owner)
        with run.lock:
            self._drop(run)

    def _drop(self, run: Run) -> None:
        """Unregister and free a run (its lock held)."""
        with self._runs_lock:
            self._runs.pop(run.id, None)
        self._free(run, RunState.CLOSED)

    @staticmethod
    def _free(run: Run, state: str) -> None:
        run.cache = None
        run.checkpoint = None
        run.logits = []
        run.watch_log = []
        run.last_logits = None
        run.host_pack = None
        run.state = state

    # ----- public operations ------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 16,
        breakpoints: Iterable[Any] | None = None,
        sampling: Sampling | None = None,
        owner: str = "",
        record_logits: bool = False,
        watches: Iterable[Any] | None = None,
    ) -> Run:
        """Start a run and execute it to its first breakpoint or its end.

        ``watches`` are breakpoints that do not pause: the block's output at each
        hit is kept on the server (see :meth:`watched`), with no round trip.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise BadRequestError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        ids = self.encode(prompt)
        self._check_positions(len(ids), max_new_tokens)
        bps = parse_breakpoints(breakpoints, self.num_layers, max_new_tokens)
        watch = parse_breakpoints(watches, self.num_layers, max_new_tokens)
        sampling = sampling or Sampling()
        gen = None
        if sampling.temperature > 0:
            gen = torch.Generator(device=self.device).manual_seed(sampling.seed)
        from transformers import DynamicCache

        run = Run(
            id=self._new_id(),
            owner=owner,
            prompt_ids=ids,
            max_new_tokens=max_new_tokens,
            breakpoints=bps,
            sampling=sampling,
            generator=gen,
            cache=DynamicCache(config=self.model.config),
            record_logits=record_logits,
            watches=watch,
        )
        self._register(run)
        with run.lock:
            self._advance(run, None)
        return run

    def resume(self, run_id: str, edit: Edit | None = None, owner: str = "") -> Run:
        """Continue a paused run (with an optional edit) to its next breakpoint or end."""
        run = self.get(run_id, owner)
        with run.lock:
            self._require_paused(run)
            self._restore(run)
            start = self._edited(run.checkpoint, edit)  # validates before anything changes
            self._advance(run, start)
        return run

    def fork(
        self,
        run_id: str,
        edit: Edit | None = None,
        breakpoints: Iterable[Any] | None = None,
        owner: str = "",
        max_new_tokens: int | None = None,
    ) -> Run:
        """A new run continued from this run's checkpoint; the original stays paused, untouched.

        ``breakpoints=None`` keeps the parent's; pass ``[]`` to run the fork to its end.
        ``max_new_tokens`` shortens (or lengthens) the fork; it must exceed the paused step.
        """
        parent = self.get(run_id, owner)
        with parent.lock:
            self._require_paused(parent)
            self._restore(parent)
            cp = parent.checkpoint
            start = self._edited(cp, edit)
            limit = parent.max_new_tokens if max_new_tokens is None else max_new_tokens
            if isinstance(limit, bool) or not isinstance(limit, int) or limit <= cp.step:
                raise BadRequestError(
                    f"max_new_tokens for a fork paused at step {cp.step} must be an integer > {cp.step}, got {limit!r}"
                )
            self._check_positions(len(parent.prompt_ids), limit)
            bps = (
                tuple(b for b in parent.breakpoints if b.step is None or b.step < limit)
                if breakpoints is None
                else parse_breakpoints(breakpoints, self.num_layers, limit)
            )
            t0 = time.perf_counter()
            cache = kvcache.fork_cache(parent.cache)
            swap = {id(parent.cache): cache}
            child_cp = Checkpoint(
                cp.layer,
                cp.step,
                cp.hidden,
                cp.pending,
                tuple(swap.get(id(a), a) for a in cp.args),
                {k: swap.get(id(v), v) for k, v in cp.kwargs.items()},
                graphs=cp.graphs,
            )
            gen = None
            if parent.generator is not None:
                gen = torch.Generator(device=self.device)
                gen.set_state(parent.generator.get_state())
            child = Run(
                id=self._new_id(),
                owner=owner,
                prompt_ids=list(parent.prompt_ids),
                max_new_tokens=limit,
                breakpoints=bps,
                watches=parent.watches,
                watch_log=list(parent.watch_log),
                sampling=parent.sampling,
                generator=gen,
                cache=cache,
                record_logits=parent.record_logits,
                token_ids=list(parent.token_ids),
                step=parent.step,
                checkpoint=child_cp,
                parent=parent.id,
                topk=list(parent.topk),
                logits=list(parent.logits),
            )
            child.timings["fork_copy"] = time.perf_counter() - t0
        self._register(child)
        with child.lock:
            self._advance(child, start)
        return child

    def edit(self, run_id: str, edit: Edit, owner: str = "") -> Run:
        """Change the paused activation in place; later resume/fork continue from it."""
        run = self.get(run_id, owner)
        with run.lock:
            self._require_paused(run)
            self._restore(run)
            run.checkpoint.pending = self._edited(run.checkpoint, edit)
        return run

    def reset_edit(self, run_id: str, owner: str = "") -> Run:
        """Drop edits: the pending activation is the block's own output again."""
        run = self.get(run_id, owner)
        with run.lock:
            self._require_paused(run)
            self._restore(run)  # the packed layout counts the edited activation
            run.checkpoint.pending = run.checkpoint.hidden
        return run

    def activation(self, run_id: str, owner: str = "", original: bool = False) -> torch.Tensor:
        """The paused activation (edits applied unless ``original``), on the device."""
        run = self.get(run_id, owner)
        with run.lock:
            self._require_paused(run)
            cp = run.checkpoint
            return cp.hidden if original else cp.pending

    def watched(self, run_id: str, owner: str = "") -> list[tuple[int, int, torch.Tensor]]:
        """(layer, step, block output) for every watch hit so far, in execution order."""
        run = self.get(run_id, owner)
        with run.lock:
            return list(run.watch_log)

    # ----- residency --------------------------------------------------------------
    def offload(self, run_id: str, owner: str = "") -> Run:
        """Move a paused run's KV cache and checkpoint to (pinned) host memory, freeing the device.

        Resume, fork, edit and reset bring it back transparently; ``activation`` and
        ``watched`` read the host copy. On a CPU engine the same packing runs (so the
        path is tested), though nothing is freed.
        """
        run = self.get(run_id, owner)
        with run.lock:
            self._require_paused(run)
            if not run.offloaded:
                t0 = time.perf_counter()
                cuda = self.device.type == "cuda"
                with self._device_lock:
                    hp = offload.pack(run_tensors(run), pin=cuda)
                    if cuda:
                        torch.cuda.synchronize(self.device)
                    views = iter(hp.host_views())
                    map_run_tensors(run, lambda _t: next(views), torch.device("cpu"))
                    run.host_pack = hp
                    run.checkpoint.graphs = graphs.TailGraphSlot()  # a graph would pin device memory
                    if cuda:
                        torch.cuda.empty_cache()
                run.timings["offload"] = time.perf_counter() - t0
        return run

    def _restore(self, run: Run) -> None:
        if not run.offloaded:
            return
        t0 = time.perf_counter()
        with self._device_lock:
            views = iter(run.host_pack.to_device(self.device))
            map_run_tensors(run, lambda _t: next(views), self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        run.host_pack = None
        run.timings["restore"] = time.perf_counter() - t0

    def resident_paused_bytes(self) -> int:
        return sum(r.bytes_held() for r in self.all_runs() if r.paused and not r.offloaded)

    def enforce_budget(self, max_bytes: int, keep: str | None = None) -> list[str]:
        """Offload least-recently-used paused runs until resident paused state fits ``max_bytes``."""
        moved: list[str] = []
        candidates = sorted(
            (r for r in self.all_runs() if r.paused and not r.offloaded and r.id != keep),
            key=lambda r: r.last_used,
        )
        resident = self.resident_paused_bytes()
        for run in candidates:
            if resident <= max_bytes:
                break
            held = run.bytes_held()
            try:
                self.offload(run.id, run.owner)
            except (RunStateError, UnknownRunError):
                continue  # resumed or closed meanwhile
            moved.append(run.id)
            resident -= held
        return moved

    def expire(self, lease_seconds: float) -> list[str]:
        """Close every run nobody has touched for ``lease_seconds``; returns their ids."""
        now = time.monotonic()
        gone = []
        for run in self.all_runs():
            if now - run.last_used > lease_seconds and run.lock.acquire(blocking=False):
                try:
                    self._drop(run)
                    gone.append(run.id)
                finally:
                    run.lock.release()
        if gone and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return gone

    # ----- validation -------------------------------------------------------------
    def _check_positions(self, prompt_len: int, max_new_tokens: int) -> None:
        # Past the limit, learned position embeddings index out of range: on a GPU that is a
        # device-side assert, which would take the whole server down, not just this run.
        if self.max_positions and prompt_len + max_new_tokens > self.max_positions:
            raise BadRequestError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"{self.max_positions} positions"
            )

    @staticmethod
    def _require_paused(run: Run) -> None:
        if run.state != RunState.PAUSED or run.checkpoint is None:
            detail = f": {run.error}" if run.error else ""
            raise RunStateError(f"run {run.id} is {run.state}, not paused{detail}")

    def _edited(self, cp: Checkpoint, edit: Edit | None) -> torch.Tensor:
        """The activation to continue from: the pending one with ``edit`` applied (validated)."""
        h = cp.pending
        if edit is None or edit.empty:
            return h
        if edit.original:
            h = cp.hidden
        ref = cp.hidden
        if edit.activation is not None:
            a = edit.activation
            if not isinstance(a, torch.Tensor):
                raise ActivationError(f"activation must be a tensor, got {type(a).__name__}")
            if tuple(a.shape) != tuple(ref.shape):
                raise ActivationError(
                    f"activation has shape {tuple(a.shape)}, the checkpoint at layer {cp.layer} "
                    f"step {cp.step} has {tuple(ref.shape)}"
                )
            if a.dtype != ref.dtype:
                raise ActivationError(
                    f"activation has dtype {str(a.dtype).replace('torch.', '')}, the model runs in "
                    f"{str(ref.dtype).replace('torch.', '')}"
                )
            if not bool(torch.isfinite(a).all()):
                raise ActivationError("activation contains NaN or infinite values")
            h = a.to(ref.device)
        if edit.scale is not None:
            s = edit.scale
            if not finite_number(s):
                raise ActivationError(f"scale must be a finite number, got {s!r}")
            h = h * s
        if edit.add is not None:
            v = edit.add
            if not isinstance(v, torch.Tensor):
                raise ActivationError(f"add must be a tensor, got {type(v).__name__}")
            hidden = ref.shape[-1]
            if tuple(v.shape) not in ((hidden,), tuple(ref.shape)):
                raise ActivationError(
                    f"add must have shape ({hidden},) or {tuple(ref.shape)}, got {tuple(v.shape)}"
                )
            if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
                raise ActivationError("add must be a finite floating-point tensor")
            h = h + v.to(device=ref.device, dtype=ref.dtype)
        if (edit.scale is not None or edit.add is not None) and not bool(torch.isfinite(h).all()):
            raise ActivationError(
                f"the edit makes the activation non-finite in {str(ref.dtype).replace('torch.', '')} "
                "(overflow); nothing was changed"
            )
        return h

    # ----- execution --------------------------------------------------------------
    def _step_input(self, run: Run) -> torch.Tensor:
        ids = run.prompt_ids if run.step == 0 else run.token_ids[-1:]
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def _model_kwargs(self, cache: Any) -> dict[str, Any]:
        kw: dict[str, Any] = {self.anatomy.cache_arg: cache, "use_cache": True}
        if self.anatomy.logits_to_keep:
            kw["logits_to_keep"] = 1
        return kw

    def _forward_until(
        self,
        ids: torch.Tensor,
        cache: Any,
        stop_layer: int | None,
        watch: Callable[[int, torch.Tensor], None] | None = None,
        watch_layers: Sequence[int] = (),
    ) -> torch.Tensor:
        """The model's own forward; with ``stop_layer``, raise ``_Pause`` after that block.

        ``watch(layer, output)`` is called after each block in ``watch_layers`` it reaches.
        """
        handles = []
        for layer in watch_layers:
            if stop_layer is None or layer <= stop_layer:
                hook = lambda _m, _a, out, layer=layer: watch(layer, block_output(out))  # noqa: E731
                handles.append(self.anatomy.blocks[layer].register_forward_hook(hook))
        try:
            if stop_layer is None:
                return self.model(input_ids=ids, **self._model_kwargs(cache)).logits[:, -1, :]
            block = self.anatomy.blocks[stop_layer]
            seen: dict[str, Any] = {}

            def pre(_mod, args, kwargs):
                seen["args"], seen["kwargs"] = args, kwargs

            def post(_mod, _args, _kwargs, out):
                t0 = time.perf_counter()
                a, kw = seen["args"], seen["kwargs"]
                if a:
                    a = a[1:]
                else:
                    kw = {k: v for k, v in kw.items() if k != "hidden_states"}
                raise _Pause(stop_layer, block_output(out), a, kw, time.perf_counter() - t0)

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.register_forward_hook(post, with_kwargs=True))
            self.model(input_ids=ids, **self._model_kwargs(cache))
        finally:
            for h in handles:
                h.remove()
        raise ExecutionError(f"the forward finished without reaching block {stop_layer}")

    def _continue(
        self,
        h: torch.Tensor,
        start: int,
        args: tuple,
        kwargs: dict,
        stop_layers: set[int],
        watch: Callable[[int, torch.Tensor], None] | None = None,
        watch_layers: Sequence[int] = (),
    ) -> torch.Tensor:
        """Blocks ``start..`` and the head from ``h``; ``_Pause`` after any of ``stop_layers``."""
        blocks = self.anatomy.blocks
        for i in range(start, len(blocks)):
            h = block_output(blocks[i](h, *args, **kwargs))
            if i in watch_layers:
                watch(i, h)
            if i in stop_layers:
                raise _Pause(i, h, args, kwargs)
        return run_tail(self.anatomy, h)

    def _probe_split(self, ids: torch.Tensor, cache: Any, layer: int) -> torch.Tensor:
        try:
            self._forward_until(ids, cache, layer)
        except _Pause as p:
            return self._continue(p.hidden, layer + 1, p.args, p.kwargs, set())
        raise ExecutionError("probe did not pause")

    @staticmethod
    def _stop_layers(run: Run, step: int, after: int = -1, points: str = "breakpoints") -> list[int]:
        return [b.layer for b in getattr(run, points) if b.layer > after and b.hits(b.layer, step)]

    def _advance(self, run: Run, start: torch.Tensor | None) -> None:
        """Execute ``run`` until it pauses or ends. ``start``: continue its checkpoint from this."""
        with self._device_lock, torch.inference_mode():
            t0 = time.perf_counter()
            run.state = RunState.RUNNING  # listing and the residency budget leave it alone
            try:
                self._advance_locked(run, start)
            except torch.OutOfMemoryError as e:
                self._fail(run, f"out of device memory: {e}")
            except Exception as e:  # noqa: BLE001 - the cache may be half-written: the run cannot go on
                self._fail(run, f"{type(e).__name__}: {e}")
            finally:
                # Host time: a finished step has synchronized (the token was read); a pause has
                # not, on purpose: the client's next look at the activation will wait for it.
                run.timings["execute"] = time.perf_counter() - t0

    def _fail(self, run: Run, message: str) -> None:
        self._free(run, RunState.FAILED)
        run.error = message
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        raise ExecutionError(f"run {run.id} failed: {message}")

    def _advance_locked(self, run: Run, start: torch.Tensor | None) -> None:
        while True:
            cp = run.checkpoint
            step = run.step
            watch = lambda layer, out: run.watch_log.append((layer, step, out))  # noqa: E731
            try:
                if cp is not None:
                    if start is None:
                        start = cp.pending
                    stops = set(self._stop_layers(run, step, cp.layer))
                    watched = set(self._stop_layers(run, step, cp.layer, "watches"))
                    if run.parent is not None and not stops and not watched and self.cuda_graphs:
                        logits = self._continue_fork(run, cp, start)
                    else:
                        run.continued_by = "eager"
                        logits = self._continue(start, cp.layer + 1, cp.args, cp.kwargs, stops, watch, watched)
                    run.checkpoint = None
                else:
                    stops = self._stop_layers(run, step)
                    logits = self._forward_until(
                        self._step_input(run),
                        run.cache,
                        min(stops) if stops else None,
                        watch,
                        self._stop_layers(run, step, points="watches"),
                    )
            except _Pause as p:
                run.checkpoint = Checkpoint(p.layer, step, p.hidden, p.hidden, p.args, p.kwargs)
                run.timings["checkpoint"] = p.capture_s
                run.state = RunState.PAUSED
                return
            start = None
            token = self._pick(run, logits)
            run.token_times.append(time.perf_counter())
            run.token_ids.append(token)
            run.step += 1
            if run.step >= run.max_new_tokens or token in self.eos_ids:
                run.state = RunState.DONE
                run.cache = None  # frees the device memory; tokens and logits stay
                return

    def _continue_fork(self, run: Run, cp: Checkpoint, start: torch.Tensor) -> torch.Tensor:
        """A fork's continuation: eager, then captured as a CUDA graph and replayed (see graphs.py)."""
        slot = cp.graphs
        slot.forks += 1
        tail = lambda h, a, kw: self._continue(h, cp.layer + 1, a, kw, set())  # noqa: E731
        if slot.graph is not None:
            logits = slot.graph.replay(start).clone()
            slot.graph.copy_cache_into(run.cache)
            slot.replays += 1
            run.continued_by = "cuda-graph"
            return logits
        capture = slot.disabled is None and slot.forks > graphs.CAPTURE_AFTER
        before = kvcache.fork_cache(run.cache) if capture else None  # the eager run below writes run.cache
        logits = tail(start, cp.args, cp.kwargs)
        run.continued_by = "eager"
        if capture:
            try:
                graph = graphs.TailGraph(tail, cp.layer + 1, start, cp.args, cp.kwargs, run.cache, before)
                graph.replay(start)
                if graph.matches(logits, run.cache):
                    slot.graph = graph
                    run.continued_by = "eager (graph captured)"
                else:
                    slot.disabled = "graph replay differed from eager execution"
            except Exception as e:  # noqa: BLE001 - any capture failure keeps the eager path
                slot.disabled = f"capture failed: {type(e).__name__}: {e}"
        return logits

    def _pick(self, run: Run, logits: torch.Tensor) -> int:
        """The next token (greedy argmax, or a seeded sample) and the top-k, in one device read."""
        row = logits[0]
        vals, idx = torch.topk(row.float().log_softmax(-1), min(TOP_K, row.shape[-1]))
        run.last_logits = row
        if run.record_logits:
            run.logits.append(row)
        s = run.sampling
        if s.temperature == 0:
            choice = torch.argmax(row, dim=-1)
        else:
            scores = row.float() / s.temperature
            if s.top_k:
                kth = torch.topk(scores, min(s.top_k, scores.shape[-1])).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            choice = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=run.generator)
        # float64 holds every token id exactly; one transfer instead of three syncs
        packed = torch.cat([choice.reshape(1).double(), idx.double(), vals.double()]).tolist()
        k = len(idx)
        run.topk.append([(int(i), v) for i, v in zip(packed[1 : 1 + k], packed[1 + k :])])
        return int(packed[0])


_PROCESSOR_SETTINGS = {  # generation_config fields that change greedy decoding, and their no-op values
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "min_new_tokens": (None, 0),
    "sequence_bias": (None,),
}


def _ignored_generation_settings(model: nn.Module) -> list[str]:
    cfg = getattr(model, "generation_config", None)
    if cfg is None:
        return []
    return [f"{k}={getattr(cfg, k)!r}" for k, noop in _PROCESSOR_SETTINGS.items() if getattr(cfg, k, None) not in noop]
