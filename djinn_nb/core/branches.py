"""Two branches of one prompt compared: where their tokens part, how far apart their states are.

Why on the server, in one call: a rewind or a fork makes a second branch of a generation, and the
question a debugger user asks next is the *difference* — the first step whose tokens differ, the
distance between the two residual streams at each (layer, step), the KL between the two next-token
distributions at each step, and what each branch would have said at the divergence. Fetching the
states to compare them would move layers × steps activations over the wire; here only the numbers
go back (a few KB).

Where the states come from, per (layer, step) and branch:

- **watched**: the branch recorded that site there (``watches=`` at generate, which forks and
  rewinds inherit): exactly the value the branch computed, edits included. (A watch at the very
  point a run paused records the value there before any edit made at the pause.)
- **recomputed**: otherwise the step is run again from the branch's *own* KV cache, cropped to
  before the step (as ``rewind`` does), with its own input token: the cache carries every earlier
  step as the branch computed it, edits included, so this is the branch's own computation at every
  step it did not edit. Each recomputation is checked against the branch: the keys and values it
  writes must equal those the branch stored for that step, and its top-k log-probabilities those the
  branch recorded. Where they do not (an edit was made in that step: a fork's or an edited resume's
  first step), the step is *unreproduced*: its cells from two layers below the first differing
  key/value layer on (a residual stream scaled at layer L moves layer L+1's keys by rounding alone,
  since its layer norm undoes the scale; L+2's plainly), and its KL, are ``None`` rather than
  values the branch never had (watch those layers to see them).

The next-token distributions are the branch's recorded logits (``record_logits``) where it kept
them, else the recomputed step's; the KL is ``KL(a ‖ b) = Σ p_a (log p_a − log p_b)`` of the two
softmaxes in fp32. Distances are the L2 norm of the difference over the step's positions (all the
prompt's at step 0, one after), in fp32. Nothing of either run changes; the recomputation's cache
copy and states live only for one step at a time (what :func:`work_bytes` estimates for admission).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch

from ..errors import BadRequestError, BreakpointError, RunStateError
from ..states import RunState
from . import kvcache
from .scheduler import CallStopped
from .sites import RESIDUAL_SITES, SITES
from .specs import Point
from .views import lens_topk

if TYPE_CHECKING:  # pragma: no cover
    from .architecture import Anatomy
    from .residency import Residency
    from .runs import Run
    from .scheduler import FairScheduler
    from .stepping import Stepper

__all__ = ["BranchDiff", "diff", "check_request", "work_bytes"]

#: how far (relative to the stored values' largest magnitude) a recomputed step's keys and values may
#: lie from the branch's own and still count as the same computation: batched forks and CUDA graphs
#: may round differently from a one-row eager step; an edit moves them by far more
REPRODUCED = {torch.float32: 1e-4, torch.float64: 1e-8}
REPRODUCED_LOW = 2e-2  # 16-bit dtypes


class BranchHost(Protocol):
    """What :func:`diff` uses of the engine."""

    device: torch.device
    residency: "Residency"
    stepper: "Stepper"
    anatomy: "Anatomy"

    @property
    def num_layers(self) -> int: ...

    def get(self, run_id: str, owner: str = "") -> "Run": ...

    def check_site(self, layer: int, site: str) -> None: ...

    def new_cache(self) -> Any: ...

    def device_turn(self) -> "FairScheduler": ...


@dataclass
class BranchDiff:
    """What :func:`diff` found; ``distance``/``norm`` are ``[layer index][step index]``."""

    layers: list[int]
    steps: list[int]
    site: str
    divergence: int | None
    distance: list[list[float | None]]
    norm: list[list[float | None]]
    kl: list[float | None]
    source: list[str]
    tokens_a: list[int] = field(default_factory=list)
    tokens_b: list[int] = field(default_factory=list)
    unreproduced_a: list[int] = field(default_factory=list)
    unreproduced_b: list[int] = field(default_factory=list)
    topk_a: list[tuple[int, float]] | None = None
    topk_b: list[tuple[int, float]] | None = None
    lens_a: list[list[tuple[int, float]]] | None = None
    lens_b: list[list[tuple[int, float]]] | None = None


def check_request(host: BranchHost, a: "Run", b: "Run", layers: Sequence[int] | None, site: Any, k: Any,
                  steps: Sequence[int] | None) -> tuple[list[int], str, int, list[int]]:
    """The diff's layers, site, k and steps, checked before anything is computed."""
    for run in (a, b):
        if run.state not in (RunState.PAUSED, RunState.DONE) or run.cache is None:
            raise RunStateError(f"run {run.id} is {run.state}: only paused or finished runs can be compared")
    if list(a.prompt_ids) != list(b.prompt_ids):
        raise BadRequestError(f"runs {a.id} and {b.id} have different prompts ({len(a.prompt_ids)} and "
                              f"{len(b.prompt_ids)} tokens): diff compares branches of one prompt")
    n = host.num_layers
    if layers is None:
        layers = list(range(n))
    if not isinstance(layers, (list, tuple)) or not layers or any(type(x) is not int or not 0 <= x < n for x in layers):
        raise BadRequestError(f"layers must be a non-empty list of integers in 0..{n - 1}, got {str(layers)[:100]}")
    layers = sorted(set(layers))
    if type(site) is not str or site not in SITES:
        raise BreakpointError(f"site must be one of {list(SITES)}, got {str(site)[:60]!r}")
    for layer in layers:
        host.check_site(layer, site)
    vocab = int(host.anatomy.head_weight.shape[0])
    if type(k) is not int or not 1 <= k <= min(vocab, 100):
        raise BadRequestError(f"k must be an integer in 1..{min(vocab, 100)}, got {str(k)[:40]}")
    common = min(len(a.token_ids), len(b.token_ids))  # steps both have finished
    if steps is None:
        steps = [0, common]
    if (not isinstance(steps, (list, tuple)) or len(steps) != 2 or any(type(s) is not int for s in steps)
            or not 0 <= steps[0] <= steps[1] <= common):
        raise BadRequestError(f"steps is [start, stop) within the {common} steps both runs finished, "
                              f"got {str(steps)[:60]}")
    return layers, site, k, list(range(steps[0], steps[1]))


def work_bytes(prompt_len: int, steps: int, layers: int, hidden: int, vocab: int, kv_per_position: int,
               element: int) -> int:
    """What a diff allocates at most at once: a cache copy as long as the longer branch, both
    branches' states at the widest step (the prompt pass) and two fp32 copies of them, logits."""
    positions = prompt_len + max(steps, 1)
    states = 2 * layers * prompt_len * hidden * (element + 8)
    return kv_per_position * positions + states + 8 * 4 * vocab


def diff(host: BranchHost, a_id: str, b_id: str, owner: str = "", layers: Sequence[int] | None = None,
         site: str = "resid_post", k: int = 5, steps: Sequence[int] | None = None) -> BranchDiff:
    """Compare runs ``a_id`` and ``b_id`` of ``owner`` (one prompt); see the module docstring."""
    a, b = host.get(a_id, owner), host.get(b_id, owner)
    first, second = sorted((a, b), key=lambda r: r.id)  # one lock order for all callers (re-entrant: a may be b)
    with first.lock, second.lock:
        layer_list, site, k, step_list = check_request(host, a, b, layers, site, k, steps)
        for run in (first, second):
            host.residency.restore(run)
        return _Differ(host, a, b, layer_list, site, k).run(step_list)


@dataclass
class _Step:
    """One branch's states at one step: per layer (positions, ...) or None, and its logits."""

    states: dict[int, torch.Tensor | None]
    logits: torch.Tensor | None
    watched: bool
    unreproduced: bool = False


class _Differ:
    def __init__(self, host: BranchHost, a: "Run", b: "Run", layers: list[int], site: str, k: int):
        self.host, self.a, self.b, self.layers, self.site, self.k = host, a, b, layers, site, k

    def run(self, steps: list[int]) -> BranchDiff:
        a, b = self.a, self.b
        common = min(len(a.token_ids), len(b.token_ids))
        divergence = next((s for s in range(common) if a.token_ids[s] != b.token_ids[s]), None)
        rows = len(self.layers)
        distance: list[list[float | None]] = [[] for _ in range(rows)]
        norm: list[list[float | None]] = [[] for _ in range(rows)]
        kl: list[float | None] = []
        source: list[str] = []
        unrep: tuple[list[int], list[int]] = ([], [])
        out = BranchDiff(self.layers, steps, self.site, divergence, distance, norm, kl, source, list(a.token_ids),
                         list(b.token_ids), *unrep)
        sched = self.host.device_turn()
        try:
            with sched, torch.inference_mode():
                for i, s in enumerate(steps):
                    if i:
                        sched.between_steps(a)
                    sa, sb = self._both(s)
                    for j, layer in enumerate(self.layers):
                        ha, hb = sa.states[layer], sb.states[layer]
                        if ha is None or hb is None:
                            distance[j].append(None)
                            norm[j].append(None)
                            continue
                        fa = ha.float()
                        distance[j].append(_num((fa - hb.float()).norm()))
                        norm[j].append(_num(fa.norm()))
                    kl.append(None if sa.logits is None or sb.logits is None else _num(_kl(sa.logits, sb.logits)))
                    source.append("watched" if sa.watched and sb.watched else "recomputed")
                    for mine, st in zip(unrep, (sa, sb)):
                        if st.unreproduced:
                            mine.append(s)
                if divergence is not None:
                    self._at_divergence(out, divergence)
        except CallStopped as e:  # the client left or the call ran past its time: nothing to undo
            raise e.error from None
        return out

    def _both(self, s: int) -> tuple[_Step, _Step]:
        sa = self._states(self.a, s)
        sb = sa if self.b is self.a else self._states(self.b, s)
        return sa, sb

    # ----- the divergence --------------------------------------------------------------------
    def _at_divergence(self, out: BranchDiff, d: int) -> None:
        sa, sb = self._both(d)
        out.topk_a, out.topk_b = self._topk(self.a, sa, d), self._topk(self.b, sb, d)
        if self.site in RESIDUAL_SITES:
            out.lens_a, out.lens_b = self._lens(sa), self._lens(sb)

    def _topk(self, run: "Run", st: _Step, d: int) -> list[tuple[int, float]]:
        """The distribution step ``d``'s token was chosen from: from its logits where known (any k),
        else the top-k the branch recorded (at most sampling.TOP_K)."""
        if st.logits is not None:
            probs = st.logits.float().softmax(-1)
            vals, idx = torch.topk(probs, min(self.k, probs.shape[-1]))
            return [(int(i), float(p)) for i, p in zip(idx.tolist(), vals.tolist())]
        return [(int(i), math.exp(lp)) for i, lp in run.topk[d][: self.k]]

    def _lens(self, st: _Step) -> list[list[tuple[int, float]]]:
        """Per layer, the logit lens's top-k at the step's last position ([] where unknown)."""
        rows: list[list[tuple[int, float]]] = []
        for layer in self.layers:
            h = st.states[layer]
            if h is None:
                rows.append([])
                continue
            ids, probs = lens_topk(self.host.anatomy, h[-1:].to(self.host.device), self.k)
            rows.append([(int(i), float(p)) for i, p in zip(ids[0].tolist(), probs[0].tolist())])
        return rows

    # ----- one branch's step -------------------------------------------------------------
    def _states(self, run: "Run", s: int) -> _Step:
        hits: dict[int, torch.Tensor] = {}
        for hit in run.watch_log:
            if hit.step == s and hit.site == self.site and hit.layer in self.layers:
                hits[hit.layer] = hit.tensor[0]  # the last hit wins (a replayed step records again)
        logits = run.logits[s] if s < len(run.logits) else None
        if len(hits) == len(self.layers) and logits is not None:
            return _Step(dict(hits), logits, watched=True)
        done = self._recompute(run, s)
        states: dict[int, torch.Tensor | None] = {}
        for layer in self.layers:
            if layer in hits:
                states[layer] = hits[layer]
            elif done.bad_from is not None and layer >= done.bad_from:
                states[layer] = None
            else:
                states[layer] = done.states[layer]
        if logits is None and done.bad_from is None:
            logits = done.logits
        return _Step(states, logits, watched=len(hits) == len(self.layers), unreproduced=done.bad_from is not None)

    def _recompute(self, run: "Run", s: int) -> "_Recomputed":
        """Step ``s`` of ``run`` again, from its cache cropped to before it, its states at the
        diff's site recorded; ``bad_from``: the lowest layer from which it is not the run's own."""
        host = self.host
        prompt = len(run.prompt_ids)
        start = 0 if s == 0 else prompt + s - 1  # the step's first position
        cache = host.new_cache() if s == 0 else _cropped(run.cache, start)
        ids = run.prompt_ids if s == 0 else [run.token_ids[s - 1]]
        x = torch.tensor([ids], dtype=torch.long, device=host.device)
        seen: dict[int, torch.Tensor] = {}

        def record(layer: int, _site: str, value: torch.Tensor) -> None:
            seen[layer] = value[0]

        logits = host.stepper.forward(x, cache, None, [Point.at(layer, self.site) for layer in self.layers], record)[0]
        first_bad = _first_different_layer(cache, run.cache, start, start + len(ids))
        if first_bad is None and s < len(run.topk) and not _same_topk(logits, run.topk[s]):
            first_bad = host.num_layers  # an edit after the last keys and values: the output alone shows it
        # two layers below: a scaled residual stream moves the next layer's keys by rounding alone
        # (its layer norm undoes the scale), the one after plainly
        bad_from = None if first_bad is None else max(0, first_bad - 2)
        return _Recomputed(seen, logits, bad_from)


@dataclass
class _Recomputed:
    states: dict[int, torch.Tensor]
    logits: torch.Tensor
    bad_from: int | None


def _cropped(cache: Any, length: int) -> Any:
    """A copy of ``cache`` holding its first ``length`` positions (views; the source is untouched)."""
    from transformers.cache_utils import DynamicLayer

    mine = kvcache.fork_cache(cache)
    odd = [i for i, layer in enumerate(mine.layers) if type(layer) is not DynamicLayer]
    if odd:
        raise BadRequestError(
            f"diff recomputes a step from a cropped KV cache; this model's layer {odd[0]} keeps a "
            f"{type(mine.layers[odd[0]]).__name__} (a sliding window or a state): watch the layers "
            "(watches=) on both runs instead")
    for layer in mine.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-2] > length:
                setattr(layer, name, t[..., :length, :])
    return mine


def _first_different_layer(new: Any, old: Any, start: int, stop: int) -> int | None:
    """The first layer whose keys or values at positions [start, stop) differ between the two
    caches (beyond rounding, see ``REPRODUCED``); None if every layer's agree."""
    for i, (n, o) in enumerate(zip(new.layers, old.layers)):
        for name in ("keys", "values"):
            tn, to = getattr(n, name, None), getattr(o, name, None)
            if not isinstance(tn, torch.Tensor) or not isinstance(to, torch.Tensor):
                continue
            if to.shape[-2] < stop:
                return i  # the run never stored this step here
            pn, po = tn[..., start:stop, :], to[..., start:stop, :]
            if torch.equal(pn, po):
                continue
            tol = REPRODUCED.get(po.dtype, REPRODUCED_LOW)
            scale = float(po.abs().amax().float()) or 1.0
            if float((pn.float() - po.float()).abs().amax()) > tol * scale:
                return i
    return None


def _same_topk(logits: torch.Tensor, recorded: list[tuple[int, float]]) -> bool:
    """Whether recomputed ``logits`` give the log-probabilities the run recorded for its top-k."""
    if not recorded:
        return True
    lp = logits.float().log_softmax(-1)
    ids = torch.tensor([i for i, _ in recorded], device=lp.device)
    want = torch.tensor([v for _, v in recorded], dtype=torch.float32, device=lp.device)
    return float((lp[ids] - want).abs().amax()) <= REPRODUCED.get(logits.dtype, REPRODUCED_LOW) * 10


def _kl(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """KL(p_a ‖ p_b) of the softmaxes of two logit rows, in fp32."""
    pa, pb = la.float().log_softmax(-1), lb.float().log_softmax(-1)
    return torch.nn.functional.kl_div(pb, pa, reduction="sum", log_target=True)


def _num(t: torch.Tensor) -> float | None:
    """A finite float, to 8 significant digits (the reply's size), or None."""
    x = float(t)
    return float(f"{x:.8g}") if math.isfinite(x) else None
