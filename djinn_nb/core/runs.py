"""A run's server-side state: its checkpoint, KV cache, tokens, and the tensors it holds.

The :class:`~djinn_nb.core.engine.Engine` drives runs; this module only describes
them and walks their tensors (for ``bytes_held``, offload and restore). What a client is
told of a run (its brief, listing row and summary) is built by serving
(:mod:`djinn_nb.serving.run_views`) from these fields: core knows nothing of the wire.
"""
from __future__ import annotations

import collections
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import UnknownRunError
from ..states import RunState
from . import graphs, kvcache, offload
from .specs import Breakpoint, Point, Sampling
from .trajectory import Trajectory, WatchHit


@dataclass(eq=False)
class Checkpoint:
    """Where a run paused: ``site`` of block ``layer`` at ``step``, and how to go on from there.

    ``saved`` holds the earlier sites of the same block that finishing it needs
    (:meth:`~djinn_nb.core.sites.BlockParts.needs`); ``args``/``kwargs`` are how the
    model called its blocks (after the hidden state), reused for the blocks after.
    """

    layer: int
    step: int
    hidden: torch.Tensor  # as the model produced it; never modified
    pending: torch.Tensor  # what resume/fork continue from (hidden unless edited)
    args: tuple  # the block's positional args after hidden_states
    kwargs: dict
    site: str = "resid_post"
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    created: float = field(default_factory=time.perf_counter)
    graphs: graphs.TailGraphSlot = field(default_factory=graphs.TailGraphSlot)  # shared with forks
    #: (pending, its activation_stats): a summary reuses them until pending is replaced
    stats: tuple[torch.Tensor, dict[str, Any]] | None = field(default=None, repr=False, compare=False)

    @property
    def edited(self) -> bool:
        return self.pending is not self.hidden

    @property
    def where(self) -> str:
        where = f"layer {self.layer} step {self.step}"
        return where if self.site == "resid_post" else f"{where} site {self.site}"


class VersionedLock:
    """A run's re-entrant lock, counting how often it was let go.

    A run changes only under its lock, so a value worked out from it at ``version`` v is
    still current while the version is v: ``bytes_held`` is cached on it, and clients send
    it back to learn, at the cost of an int, whether their copy of a run's details is stale.
    """

    __slots__ = ("_lock", "version")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.version = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self.version += 1  # before letting go: the next holder never sees the old version
        self._lock.release()

    def __enter__(self) -> "VersionedLock":
        self._lock.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.version += 1
        self._lock.release()


@dataclass(eq=False)  # a run is itself: `in`/`==` compare identity, never fields (tensors, a batch's rows)
class Run:
    """One generation's server-side state. Use it through :class:`Engine`."""

    id: str
    owner: str
    prompt_ids: list[int]
    max_new_tokens: int
    breakpoints: tuple[Breakpoint, ...]
    sampling: Sampling
    generator: torch.Generator | None
    cache: Any
    record_logits: bool = False
    watches: tuple[Breakpoint, ...] = ()
    #: the per-step records (tokens, top-k, entropies, times, sampler states, logits, watch hits):
    #: their one owner; the properties below read them
    trajectory: Trajectory = field(default_factory=Trajectory)
    step: int = 0
    state: RunState = RunState.RUNNING
    checkpoint: Checkpoint | None = None
    error: str | None = None
    parent: str | None = None
    #: a one-shot stop (step, point) that overrides the breakpoints until reached (next_*, rewind)
    target: tuple[int, Point] | None = None
    forced: set[Point] = field(default_factory=set)  # conditional breakpoints that held at ``forced_step``
    forced_step: int = -1
    #: at a conditional pause, the conditions that held and the values they read (see conditional.py)
    held: dict[str, Any] | None = None
    checked_step: int = -1  # the last step whose conditions were tested
    last_point: tuple[int, str] | None = None  # (layer, site) of the last pause
    timings: dict[str, float] = field(default_factory=dict)
    continued_by: str | None = None  # how a fork ran the layers after its checkpoint
    last_used: float = field(default_factory=time.monotonic)
    host_pack: offload.HostPack | None = None
    lock: VersionedLock = field(default_factory=VersionedLock, repr=False)
    # (what it was counted at, bytes, {storage: its size})
    _bytes: tuple[tuple, int, dict[int, int]] | None = field(default=None, repr=False)
    _row = None  # not a field: (batch cache, row, rows) until ``cache`` is first read (see keep_row)

    def keep_row(self, batch_cache: Any, row: int, rows: int) -> None:
        """Take row ``row`` of a cache batched ``rows`` wide as this run's KV cache, lazily: the
        views are made when ``cache`` is first read (a batch's forks mostly end unread or closed).
        ``batch_cache`` must be a snapshot the batch no longer changes (``kvcache.fork_cache``)."""
        self._kv: Any = None
        self._row = (batch_cache, row, rows)

    # the trajectory's records, read-only here: they change only through its methods
    @property
    def token_ids(self) -> list[int]:
        return self.trajectory.token_ids

    @property
    def topk(self) -> list[list[tuple[int, float]]]:
        return self.trajectory.topk

    @property
    def entropies(self) -> list[float]:
        return self.trajectory.entropies

    @property
    def token_times(self) -> list[float]:
        return self.trajectory.token_times

    @property
    def gen_states(self) -> list[torch.Tensor]:
        return self.trajectory.gen_states

    @property
    def logits(self) -> list[torch.Tensor]:
        return self.trajectory.logits

    @property
    def last_logits(self) -> torch.Tensor | None:
        return self.trajectory.last_logits

    @property
    def watch_log(self) -> list[WatchHit]:
        return self.trajectory.watch_log

    @property
    def paused(self) -> bool:
        return self.state == RunState.PAUSED

    @property
    def done(self) -> bool:
        return self.state == RunState.DONE

    @property
    def layer(self) -> int | None:
        return self.checkpoint.layer if self.checkpoint else None

    @property
    def site(self) -> str | None:
        return self.checkpoint.site if self.checkpoint else None

    @property
    def offloaded(self) -> bool:
        return self.host_pack is not None

    def bytes_held(self) -> int:
        """Bytes of the tensors the run keeps, wherever they are: each distinct view counts its own
        bytes (a batched fork's rows of a shared KV cache, a rewound run's cropped one), views of one
        storage at most that storage's size, and the same view seen twice once. Counted again only
        after the run changed (its lock's version, and what it holds, as a cheap second check)."""
        at = (self.lock.version, self.state, self.step, id(self._kv), id(self._row), id(self.checkpoint),
              id(self.host_pack), len(self.watch_log), len(self.logits), id(self.last_logits))
        if self._bytes is None or self._bytes[0] != at:
            self._bytes = (at, *self._count_bytes())
        return self._bytes[1]

    def storages(self) -> dict[int, int]:
        """The storages the run keeps alive, each with its whole size: a view of part of a storage
        (a batched fork's row, a rewound run's crop) pins all of it once its siblings or source
        close. What quotas count, as a union over a user's (or the server's) runs, so storage
        shared by runs (a fork and its parent) counts once."""
        self.bytes_held()
        assert self._bytes is not None
        return self._bytes[2]

    def _count_bytes(self) -> tuple[int, dict[int, int]]:
        if self._row is None:
            return kvcache.count_views(self._tensors(with_cache=True), [])
        # a batch's row, not yet made: counted once for all the batch's rows (kvcache.row_count)
        counted = kvcache.row_count(self._row[0], self._row[2])
        others = self._tensors(with_cache=False)
        if counted is None:
            return kvcache.count_views(self._tensors(with_cache=True), [])
        if not others:  # a finished fork's row is all it holds
            return counted
        own, caps = kvcache.count_views(others, [])
        if caps.keys().isdisjoint(counted[1]):  # its own tensors (the last logits) share no storage with the row
            return own + counted[0], {**counted[1], **caps}
        return kvcache.count_views(others, kvcache.row_views(*self._row) or [])

    def _tensors(self, with_cache: bool) -> list[torch.Tensor]:
        found = run_tensors(self, with_cache) + list(self.logits)
        return found + [self.last_logits] if self.last_logits is not None else found

    def pending_stats(self) -> dict[str, Any] | None:
        """The paused activation's statistics (:func:`activation_stats`: a device read), or None
        when not paused; worked out once per pending tensor (edits and restores replace it)."""
        cp = self.checkpoint
        if cp is None:
            return None
        if cp.stats is None or cp.stats[0] is not cp.pending:
            cp.stats = (cp.pending, activation_stats(cp.pending))
        return cp.stats[1]


def _get_cache(run: Run) -> Any:
    row = run._row
    if row is not None:
        run._kv, run._row = kvcache.row_of(*row), None
    return run._kv


def _set_cache(run: Run, value: Any) -> None:
    run._kv, run._row = value, None


# After the dataclass is made, so that its __init__'s ``self.cache = cache`` goes through the setter.
Run.cache = property(_get_cache, _set_cache, doc="The run's KV cache (a batched fork's row made on first read).")


class RunRegistry:
    """The runs of one engine, by id, each filed under its owner.

    It also remembers the ids of the last ``EXPIRED_MEMORY`` runs closed by a lease, so
    that their owner is told the run *expired* (and what sets the lease) rather than
    that it is unknown.
    """

    EXPIRED_MEMORY = 4096

    def __init__(self) -> None:
        self._runs: dict[str, Run] = {}
        self._expired: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()  # per owner

    def expired(self, run: Run, why: str) -> None:
        """Remember that ``run`` was closed by its lease, with ``why`` to tell its owner."""
        with self._lock:
            self._expired[run.id] = (run.owner, why)
            while len(self._expired) > self.EXPIRED_MEMORY:
                self._expired.popitem(last=False)

    def new_id(self, owner: str = "") -> str:
        """``r<n>-<random>``: ``n`` counts the owner's own runs (ordered for people, and telling
        nothing of other users' activity), the random part makes it unguessable."""
        with self._lock:
            self._counts[owner] += 1
            n = self._counts[owner]
            while True:  # owners count alike, so only the random part tells two ids apart: never reuse one
                run_id = f"r{n}-{secrets.token_hex(4)}"
                if run_id not in self._runs and run_id not in self._expired:
                    return run_id

    def add(self, run: Run) -> None:
        with self._lock:
            self._runs[run.id] = run

    def holds(self, run: Run) -> bool:
        with self._lock:
            return self._runs.get(run.id) is run

    def remove(self, run: Run) -> None:
        with self._lock:
            self._runs.pop(run.id, None)

    def get(self, run_id: str, owner: str = "") -> Run:
        with self._lock:
            run = self._runs.get(run_id)
        if run is None or run.owner != owner:
            gone = self._expired.get(run_id) if run is None and isinstance(run_id, str) else None
            if gone is not None and gone[0] == owner:
                raise UnknownRunError(f"run {run_id!r} {gone[1]}")
            raise UnknownRunError(f"no run {run_id!r} (closed, expired, or another client's)"[:300])
        run.last_used = time.monotonic()
        return run

    def owned(self, owner: str = "") -> list[Run]:
        with self._lock:
            return [r for r in self._runs.values() if r.owner == owner]

    def all(self) -> list[Run]:
        with self._lock:
            return list(self._runs.values())


def activation_stats(t: torch.Tensor) -> dict[str, Any]:
    """Small statistics of an activation: overall and per-position norm, mean, max.

    Computed on the tensor's device and read back in one transfer: per position the sum,
    sum of squares, max and min (in float64: 7 small ops instead of 13, which is most of
    their cost), from which the rest follows exactly enough for display (relative
    differences ~1e-7 from float32 reductions).
    """
    f = t.detach()
    if f.dim() >= 3 and f.shape[0] != 1:
        return _activation_stats_batched(f)
    per_pos = f[0].reshape(f.shape[1], -1) if f.dim() >= 3 else f.reshape(-1, f.shape[-1])  # z: heads × head_dim
    d = per_pos.double()
    s1, s2, mx, mn = torch.stack([d.sum(-1), (d * d).sum(-1), d.amax(-1), d.amin(-1)]).tolist()
    k, n = d.shape[-1], d.numel()
    total, squares = math.fsum(s1), math.fsum(s2)
    mean = total / n
    nan = math.nan
    return {
        "norm": math.sqrt(squares),
        "mean": mean,
        "std": math.sqrt(max(0.0, (squares - n * mean * mean) / (n - 1))) if n > 1 else 0.0,
        "max": nan if any(map(math.isnan, mx)) else max(mx),
        "min": nan if any(map(math.isnan, mn)) else min(mn),
        "position_norm": [math.sqrt(x) for x in s2],
        "position_mean": [x / k for x in s1],
        "position_max": mx,
    }


def _activation_stats_batched(f: torch.Tensor) -> dict[str, Any]:
    """Overall statistics over every row of a batch, per position of the first (as a single run shows)."""
    f = f.float()
    per_pos = f[0].reshape(f.shape[1], -1)
    overall = torch.stack([f.norm(), f.mean(), f.std(), f.max(), f.min()]).tolist()
    rows = torch.stack([per_pos.norm(dim=-1), per_pos.mean(dim=-1), per_pos.amax(dim=-1)]).tolist()
    return {"norm": overall[0], "mean": overall[1], "std": overall[2], "max": overall[3], "min": overall[4],
            "position_norm": rows[0], "position_mean": rows[1], "position_max": rows[2]}


def run_tensors(run: Run, with_cache: bool = True) -> list[torch.Tensor]:
    """Every tensor a run holds, in ``map_run_tensors``'s order, without touching the run
    (``with_cache=False``: all but its KV cache's)."""
    found: list[torch.Tensor] = []
    cache, cp = (run.cache if with_cache else None), run.checkpoint
    if cache is not None:
        for layer in list(cache.layers):
            found += [t for t in list(vars(layer).values()) if isinstance(t, torch.Tensor)]
    if cp is not None:
        found += [cp.hidden] + ([cp.pending] if cp.edited else []) + [cp.saved[k] for k in sorted(cp.saved)]

        def collect(t: torch.Tensor) -> torch.Tensor:
            found.append(t)
            return t

        _map_tensors((cp.args, cp.kwargs), collect, keep=cache)
    found += [hit.tensor for hit in list(run.watch_log)]
    return found


def map_run_tensors(
    run: Run, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device | None = None
) -> None:
    """Replace each tensor a paused run holds (cache, checkpoint, block arguments, watch hits)
    by ``fn(tensor)``, always in the same order: offload and restore rely on it."""
    cache = run.cache
    if cache is not None:
        kvcache.map_cache_tensors(cache, fn, device)
    cp = run.checkpoint
    if cp is not None:
        edited = cp.edited
        cp.hidden = fn(cp.hidden)
        cp.pending = fn(cp.pending) if edited else cp.hidden
        cp.saved = {k: fn(cp.saved[k]) for k in sorted(cp.saved)}
        cp.args = _map_tensors(cp.args, fn, keep=cache)
        cp.kwargs = _map_tensors(cp.kwargs, fn, keep=cache)
    run.trajectory.map_watch_tensors(fn)


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor], keep: Any) -> Any:
    """Apply ``fn`` to every tensor inside tuples, lists and dicts; ``keep`` passes through."""
    if obj is keep:
        return obj
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(x, fn, keep) for x in obj)
    if isinstance(obj, list):
        return [_map_tensors(x, fn, keep) for x in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, keep) for k, v in obj.items()}
    return obj
