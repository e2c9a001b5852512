"""The engine: a loaded causal LM, its runs, and the calls a client makes on them.

A run is a greedy (or seeded sampling) generation with a KV cache that pauses
at breakpoints (a site of a decoder block, at a step). This module keeps the
registry of runs and the public calls — generate, resume, fork, edit, reset,
activation, watched, offload, close — and checks each request before anything
changes. The work is elsewhere: a step in :mod:`stepping`, an edit in
:mod:`edits`, offload and leases in :mod:`residency`, a run's state in :mod:`runs`.

One run executes on the device at a time (``Engine._device_lock``); a paused
run holds no lock. This module knows nothing of rpyc or notebooks.
"""
from __future__ import annotations

import logging
import os
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, NoReturn, Sequence

import torch

from ..errors import BadRequestError, BreakpointError, ExecutionError, NoTokenizerError, RunStateError
from ..states import RunState
from . import tracing, views
from .architecture import Anatomy, check_split_is_exact, find_anatomy
from .forking import Forks, ForkSpec
from .navigation import Navigator
from .residency import Residency
from .models import ignored_generation_settings
from .nanguard import NonFiniteLogits, Snapshot, on_non_finite
from .scheduler import CallStopped, FairScheduler
from .runs import Checkpoint, Run, RunRegistry
from .trajectory import WatchHit
from .sites import SITES, block_parts
from .specs import Breakpoint, Edit, Sampling, check_text, parse_breakpoints
from .threads import describe as describe_threads
from .splitprobe import split_probe
from .stepping import Stepper

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("djinn_nb.core.engine")

#: ``torch.inference_mode``'s own guard, entered without its Python wrapper (entered at every
#: call and pause; the wrapper's frames were a measurable part of a pause's host cost)
_inference_mode = getattr(torch._C, "_InferenceMode", torch.inference_mode)

__all__ = ["Engine", "ForkSpec"]

#: a text longer than this many characters per position of the model is refused before tokenizing
CHARS_PER_POSITION = 64
MAX_TOKEN_TEXT = 256


class Engine:
    """A loaded causal LM plus its runs. Thread-safe; see the module docstring.

    Forks and the debugger's navigation are collaborators (``self.forks``, ``self.navigator``)
    given this engine as a :class:`~djinn_nb.core.host.RunHost`; their calls are re-exported here.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any = None,
        name: str = "model",
        check_exact: bool = True,
        cuda_graphs: bool | None = None,
    ):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.anatomy: Anatomy = find_anatomy(model)
        self.parts = [block_parts(model, self.anatomy.blocks, i) for i in range(self.anatomy.num_layers)]
        self.device: torch.device = next(self.anatomy.lm_head.parameters()).device
        self.dtype: torch.dtype = self.anatomy.head_weight.dtype
        self._device_lock = FairScheduler()  # a turn handed on between steps (scheduler.py)
        self._registry = RunRegistry()
        self.residency = Residency(self.device, self._device_lock, self._registry, self._drop)
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        self.eos_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self._parameters = sum(p.numel() for p in model.parameters())
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("DJINN_CUDA_GRAPHS", "1") != "0"
        devices = {p.device for p in model.parameters()}
        # One device only: a graph of a model split over GPUs would span several streams.
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda" and len(devices) == 1
        self.stepper = Stepper(model, self.anatomy, self.parts, self.eos_ids, self.cuda_graphs)
        self.stepper.keep_finished = True  # finished runs keep their KV cache for rewind (navigation.py)
        self.stepper.take_turns(self._device_lock)
        self.forks = Forks(self)
        self.fork, self.fork_many = self.forks.fork, self.forks.fork_many
        self.navigator = Navigator(self)
        nav = self.navigator
        self.next_layer, self.next_step, self.rewind, self.history = nav.next_layer, nav.next_step, nav.rewind, nav.history
        cfg = model.config
        self.max_positions: int | None = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.ignored_generation_config = ignored_generation_settings(model)
        if self.ignored_generation_config:
            log.warning(
                "%s: its generation_config sets %s, which djinn_nb does not apply (greedy is plain argmax)",
                name, ", ".join(self.ignored_generation_config),
            )
        probe_layer = self.parts[max(0, self.num_layers // 2 - 1)]
        self.sites = [s for s in SITES if probe_layer.missing(s) is None]
        self.inexact_sites: dict[str, str] = {}  # sites whose hand-run finish failed the load-time probe, and why
        if check_exact:
            self.inexact_sites = check_split_is_exact(model, self.anatomy, partial(split_probe, self.stepper), self.sites)
            for site, why in self.inexact_sites.items():
                log.warning("%s: breakpoints at %s are refused: %s", name, site, why)

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
            "num_heads": self.parts[0].num_heads or int(getattr(cfg, "num_attention_heads", 0) or 0),
            "vocab_size": int(getattr(cfg, "vocab_size", 0)),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "has_tokenizer": self.tokenizer is not None,
            "block_path": self.anatomy.block_path,
            "sites": [s for s in self.sites if s not in self.inexact_sites],
            "parameters": self._parameters,
            "max_positions": self.max_positions,
            "generation_config_ignored": list(self.ignored_generation_config),
            **describe_threads(),
        }

    # ----- tokens -----------------------------------------------------------------
    @property
    def max_text_chars(self) -> int:
        """The longest text tokenized: 64 characters for each position the model has (1 MiB when it
        says none). Tokenizing costs memory in proportion to the text, before any position check."""
        return CHARS_PER_POSITION * self.max_positions if self.max_positions else 1 << 20

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise NoTokenizerError(
                    f"{self.name} has no tokenizer: pass the prompt as a list of token ids"
                )
            if len(prompt) > self.max_text_chars:
                per = f": {CHARS_PER_POSITION} per position of its {self.max_positions}" if self.max_positions else ""
                raise BadRequestError(
                    f"a text of {len(prompt)} characters is longer than this model could take ({self.max_text_chars}{per})"
                )
            ids = list(self.tokenizer(check_text(prompt))["input_ids"])
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
        else:
            raise BadRequestError(f"a prompt is a text or a list of token ids, not {type(prompt).__name__}")
        vocab = int(getattr(self.model.config, "vocab_size", 0)) or None
        if not ids:
            raise BadRequestError("the prompt is empty")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab and t >= vocab):
                raise BadRequestError(f"token id {t!r} is not an integer in 0..{(vocab or 0) - 1}")
        return ids

    def token_ids(self, text: str) -> list[int]:
        """A text's token ids, no special tokens added (a condition's or an answer's token text)."""
        assert self.tokenizer is not None
        if len(text) > MAX_TOKEN_TEXT:
            raise BadRequestError(f"a token's text is at most {MAX_TOKEN_TEXT} characters, got {len(text)}")
        return list(self.tokenizer(check_text(text), add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise NoTokenizerError(f"{self.name} has no tokenizer to decode with")
        return self.tokenizer.decode(list(ids))

    def decode_each(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text."""
        if self.tokenizer is None:
            raise NoTokenizerError(f"{self.name} has no tokenizer to decode with")
        return [self.tokenizer.decode([i]) for i in ids]

    # ----- registry ---------------------------------------------------------------
    def get(self, run_id: str, owner: str = "") -> Run:
        return self._registry.get(run_id, owner)

    def runs(self, owner: str = "") -> list[Run]:
        return self._registry.owned(owner)

    def all_runs(self) -> list[Run]:
        return self._registry.all()

    def close(self, run_id: str, owner: str = "") -> None:
        """Free a run's device memory now; closing twice is an error (unknown run)."""
        run = self.get(run_id, owner)
        with run.lock:
            self._drop(run)

    def discard(self, run: Run) -> None:
        """Close a run a failed call made (its caller never got its id), if it is still registered."""
        with run.lock:
            if self._registry.holds(run):
                self._drop(run)

    def _drop(self, run: Run) -> None:
        """Unregister and free a run (its lock held)."""
        self._registry.remove(run)
        self._free(run, RunState.CLOSED)

    @staticmethod
    def _free(run: Run, state: RunState) -> None:
        run.cache = None
        run.checkpoint = None
        run.trajectory.drop_tensors()
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
        self.check_positions(len(ids), max_new_tokens)
        bps = self.breakpoints(breakpoints, max_new_tokens)
        watch = self.breakpoints(watches, max_new_tokens)
        sampling = sampling or Sampling()
        gen = None
        if sampling.temperature > 0:
            gen = torch.Generator(device=self.device).manual_seed(sampling.seed)
        from transformers import DynamicCache

        run = Run(
            id=self._registry.new_id(owner),
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
        self._registry.add(run)
        with run.lock:
            self.advance(run, None)
        return run

    def resume(self, run_id: str, edit: Edit | None = None, owner: str = "") -> Run:
        """Continue a paused run (with an optional edit) to its next breakpoint or end."""
        patch = self.forks.patch_source(edit, owner) if edit is not None else None
        run = self.get(run_id, owner)
        with run.lock:
            cp = self.paused(run)
            if run.host_pack is not None:
                self.residency.restore(run)  # puts the checkpoint's tensors back in place
            # validates before anything changes
            start = self.forks.edited(cp, edit, patch) if edit is not None else cp.pending
            self.advance(run, start)
        return run

    def edit(self, run_id: str, edit: Edit, owner: str = "") -> Run:
        """Change the paused activation in place; later resume/fork continue from it."""
        patch = self.forks.patch_source(edit, owner)
        run = self.get(run_id, owner)
        with run.lock:
            cp = self.paused(run)
            self.residency.restore(run)
            cp.pending = self.forks.edited(cp, edit, patch)
        return run

    def reset_edit(self, run_id: str, owner: str = "") -> Run:
        """Drop edits: the pending activation is the block's own output again."""
        run = self.get(run_id, owner)
        with run.lock:
            cp = self.paused(run)
            self.residency.restore(run)  # the packed layout counts the edited activation
            cp.pending = cp.hidden
        return run

    def activation(self, run_id: str, owner: str = "", original: bool = False) -> torch.Tensor:
        """The paused activation (edits applied unless ``original``), on the device."""
        run = self.get(run_id, owner)
        with run.lock:
            cp = self.paused(run)
            return cp.hidden if original else cp.pending

    def watched(self, run_id: str, owner: str = "") -> list[WatchHit]:
        """(layer, step, site, value) for every watch hit so far, in execution order."""
        run = self.get(run_id, owner)
        with run.lock:
            return list(run.watch_log)

    # ----- what a pause shows ------------------------------------------------------
    def lens(self, run_id: str, k: int = 5, owner: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """The logit lens at a residual-stream pause: per position, the top-``k`` ids and
        probabilities of ``softmax(lm_head(final_norm(activation)))`` (edits applied)."""
        k = self._check_k(k)
        run = self.get(run_id, owner)
        with run.lock:
            cp = self.paused(run)
            views.check_lens_site(cp)
            self.residency.restore(run)
            with self._device_lock, torch.inference_mode():
                return views.lens_topk(self.anatomy, cp.pending[0], k)

    def lens_grid(self, prompt: str | Sequence[int], k: int = 1,
                  site: str = "resid_post") -> tuple[torch.Tensor, torch.Tensor]:
        """The lens at ``site`` of every layer for one prompt pass, recorded without pausing:
        ids and probabilities, each (layers, positions, k). Nothing is kept afterwards."""
        k = self._check_k(k)
        ids = self.encode(prompt)
        self.check_positions(len(ids), 1)
        if site not in ("resid_pre", "resid_mid", "resid_post"):
            raise BreakpointError(f"the lens grid reads the residual stream (resid_pre, resid_mid, resid_post), not {site!r}")
        watches = self.breakpoints([(layer, 0, site) for layer in range(self.num_layers)], 1)
        from transformers import DynamicCache

        seen: list[torch.Tensor] = []
        with self._device_lock, torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            self.stepper.sliced_forward(x, DynamicCache(config=self.model.config), (), [b.point for b in watches],
                                        lambda _layer, _site, value: seen.append(value[0]))
            return views.lens_topk_layers(self.anatomy, [h.to(self.device) for h in seen], k,
                                          self._device_lock.yield_turn)

    def attention(self, run_id: str, owner: str = "") -> torch.Tensor:
        """Block N's attention probabilities at the paused step, (batch, heads, queries, keys), fp32."""
        run = self.get(run_id, owner)
        with run.lock:
            cp = self.paused(run)
            self.residency.restore(run)
            with self._device_lock, torch.inference_mode():
                return views.attention_pattern(self.model, self.parts[cp.layer], cp, run.cache)

    def token_probs(self, run_ids: Sequence[str], token: int, owner: str = "") -> list[float]:
        """Each run's probability of ``token`` in the distribution of its last finished step."""
        vocab = int(getattr(self.model.config, "vocab_size", 0)) or 1
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
            raise BadRequestError(f"token must be an id in 0..{vocab - 1}, got {token!r}"[:200])
        # one row at a time, each run once: a stack of every listed run's logits (one run listed 4096
        # times, say) would allocate runs x vocabulary floats twice over
        rows: dict[str, torch.Tensor] = {}
        for run_id in run_ids:
            if run_id in rows:
                continue
            run = self.get(run_id, owner)
            with run.lock:
                if run.last_logits is None:
                    raise RunStateError(f"run {run.id} has finished no step yet")
                rows[run_id] = run.last_logits
        if not rows:
            return []
        with torch.inference_mode():
            probs = torch.stack([row.float().softmax(-1)[token] for row in rows.values()])
            by_id = dict(zip(rows, probs.tolist()))
        return [by_id[r] for r in run_ids]

    def causal_trace(self, clean: str | Sequence[int], corrupted: str | Sequence[int], answer: int | None = None,
                     layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
                     site: str = "resid_post", owner: str = "",
                     on_row: Callable[[int], None] = lambda done: None, **grid: Any) -> tracing.TraceGrid:
        """ROME's grid in one call, no run made per cell (tracing.py: ``grid`` is its ``spec``); its two runs closed after."""
        clean_ids, corrupt_ids = self.encode(clean), self.encode(corrupted)
        layers, positions = tracing.check_grid(self.num_layers, len(clean_ids), layers, positions)
        return tracing.causal_trace(
            self, lambda ids, n, bps, **kw: self.generate(ids, n, bps, owner=owner, **kw),
            lambda run_id: self.resume(run_id, owner=owner), lambda run_id: self.close(run_id, owner),
            clean_ids, corrupt_ids, layers, positions, site, answer, on_row, **grid)

    def _check_k(self, k: Any) -> int:
        vocab = int(getattr(self.model.config, "vocab_size", 0)) or 1
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(vocab, 100):
            raise BadRequestError(f"k must be an integer in 1..{min(vocab, 100)}, got {k!r}"[:200])
        return k

    # ----- residency --------------------------------------------------------------
    def offload(self, run_id: str, owner: str = "") -> Run:
        """Move a paused run's KV cache and checkpoint to (pinned) host memory, freeing the device.

        Resume, fork, edit and reset bring it back transparently; ``activation`` and
        ``watched`` read the host copy. On a CPU engine the same packing runs (so the
        path is tested), though nothing is freed.
        """
        run = self.get(run_id, owner)
        with run.lock:
            self.paused(run)
            self.residency.offload(run)
        return run

    def resident_paused_bytes(self) -> int:
        return self.residency.resident_paused_bytes()

    def enforce_budget(self, max_bytes: int, keep: str | None = None) -> list[str]:
        """Offload least-recently-used paused runs until resident paused state fits ``max_bytes``."""
        return self.residency.enforce_budget(max_bytes, keep)

    def expire(self, lease_seconds: float, hint: str = "") -> list[str]:
        """Close every run nobody has touched for ``lease_seconds``; returns their ids.

        ``hint`` (what sets the lease) is told to an owner who asks for one of them later.
        """
        return self.residency.expire(lease_seconds, hint)

    # ----- validation -------------------------------------------------------------
    def check_positions(self, prompt_len: int, max_new_tokens: int) -> None:
        # Past the limit, learned position embeddings index out of range: on a GPU that is a
        # device-side assert, which would take the whole server down, not just this run.
        if self.max_positions and prompt_len + max_new_tokens > self.max_positions:
            raise BadRequestError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"{self.max_positions} positions"
            )

    def breakpoints(self, specs: Iterable[Any] | None, max_new_tokens: int) -> tuple[Breakpoint, ...]:
        """Parse breakpoints (or watches) and check each site exists, exactly, in its block."""
        bps = parse_breakpoints(specs, self.num_layers, max_new_tokens,
                                token_ids=self.token_ids if self.tokenizer is not None else None)
        for b in bps:
            self.check_site(b.layer, b.site)
        return bps

    @staticmethod
    def paused(run: Run) -> Checkpoint:
        """The run's checkpoint; a ``RunStateError`` unless it is paused."""
        cp = run.checkpoint
        if run.state != RunState.PAUSED or cp is None:
            detail = f": {run.error}" if run.error else ""
            raise RunStateError(f"run {run.id} is {run.state}, not paused{detail}")
        return cp

    def check_site(self, layer: int, site: str) -> None:
        why = self.parts[layer].missing(site) or self.inexact_sites.get(site)
        if why:
            raise BreakpointError(why)

    # ----- for the collaborators (host.RunHost) -------------------------------------
    def new_run_id(self, owner: str = "") -> str:
        return self._registry.new_id(owner)

    def adopt(self, run: Run) -> None:
        self._registry.add(run)

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def device_turn(self) -> FairScheduler:
        return self._device_lock

    # ----- execution --------------------------------------------------------------
    def advance(self, run: Run, start: torch.Tensor | None) -> None:
        """Execute ``run`` until it pauses or ends. ``start``: continue its checkpoint from this."""
        with self._device_lock.turn(run.owner), _inference_mode(True):
            t0 = time.perf_counter()
            snap = Snapshot.of(run)
            run.state = RunState.RUNNING  # listing and the residency budget leave it alone
            try:
                self.stepper.advance(run, start)
            except CallStopped as e:  # client gone or over the call's time: no checkpoint to pause at
                self._drop(run)
                raise e.error from None
            except NonFiniteLogits as e:
                on_non_finite(self, run, snap, e)
            except torch.OutOfMemoryError as e:
                self.fail(run, f"out of device memory: {e}")
            except Exception as e:  # noqa: BLE001 - the cache may be half-written: the run cannot go on
                self.fail(run, f"{type(e).__name__}: {e}")
            finally:
                # Host time: a finished step has synchronized (the token was read); a pause has
                # not, on purpose: the client's next look at the activation will wait for it.
                run.timings["execute"] = time.perf_counter() - t0

    def fail(self, run: Run, message: str) -> NoReturn:
        self._free(run, RunState.FAILED)
        run.error = message
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        raise ExecutionError(f"run {run.id} failed: {message}")
