"""Copy and move HuggingFace KV caches.

A fork must not disturb the run it came from. HF's dynamic cache layers never
write into their tensors: each update concatenates into a new tensor. So a fork
can share every tensor with its parent and only needs its own layer objects,
an O(layers) copy with no device traffic. Layer types that update in place
(static caches) get real clones. :class:`CacheMark` puts a cache back exactly as it
was, the one way back for the NaN guard and the conditional breakpoints alike.
"""
from __future__ import annotations

import copy
import math
import weakref
from typing import Any, Callable, TypeVar

import torch
from transformers import cache_utils
from transformers.cache_utils import Cache, DynamicLayer


def _tensors(layer: object) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in vars(layer).items() if isinstance(v, torch.Tensor)]


#: Layer types whose ``update`` only ever rebinds new tensors (``torch.cat``), never writes in
#: place; an exact-type list, since subclasses (linear-attention states) may write in place.
_APPEND_ONLY = tuple(
    t for t in (DynamicLayer, getattr(cache_utils, "DynamicSlidingWindowLayer", None)) if t is not None
)
APPEND_ONLY = _APPEND_ONLY


_T = TypeVar("_T")


def _shallow(obj: _T) -> _T:
    """``copy.copy`` for a plain object, without the reduce protocol's cost (~1 µs, not ~8)."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    return new


def fork_cache(cache: Cache) -> Cache:
    """An independent cache with the same contents; shares tensors where that is safe."""
    new = _shallow(cache)
    layers = []
    for layer in cache.layers:
        if type(layer) in _APPEND_ONLY:
            layers.append(_shallow(layer))
        else:
            layers.append(copy.deepcopy(layer))
    new.layers = layers
    return new


def swap_cache(obj: Any, old: Any, new: Any) -> Any:
    """``obj`` (a block's args or kwargs) with the cache ``old`` replaced by ``new``, at any depth."""
    if obj is old:
        return new
    if isinstance(obj, tuple):
        return tuple(swap_cache(x, old, new) for x in obj)
    if isinstance(obj, dict):
        return {k: swap_cache(v, old, new) for k, v in obj.items()}
    return obj


def row_of(cache: Cache, row: int, rows: int) -> Cache:
    """Row ``row`` of a cache batched ``rows`` wide, as a cache of its own: views of the batch's
    tensors (no copy, no index tensor, no host sync; dynamic layers never write in place, so
    the rows stay independent). Its ``bytes_held`` counts its own rows."""
    new = fork_cache(cache)
    for layer in new.layers:
        if type(layer) not in _APPEND_ONLY:  # a deep copy: give it real rows of its own
            for name, t in list(vars(layer).items()):
                if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == rows:
                    setattr(layer, name, t.narrow(0, row, 1).clone())
            continue
        for name, t in list(vars(layer).items()):
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == rows:
                setattr(layer, name, t.narrow(0, row, 1))
    return new


def row_views(cache: Cache, row: int, rows: int) -> list[tuple[torch.Tensor, int, tuple, tuple]] | None:
    """What ``row_of(cache, row, rows)`` would hold, as (tensor it views, storage offset, shape,
    stride), without making the views (counting a batch's rows cost more than running them);
    None where ``row_of`` would copy (layers that write in place)."""
    out: list[tuple[torch.Tensor, int, tuple, tuple]] = []
    for layer in cache.layers:
        if type(layer) not in _APPEND_ONLY:
            return None
        for t in vars(layer).values():
            if isinstance(t, torch.Tensor):
                if t.dim() > 0 and t.shape[0] == rows:
                    out.append((t, int(t.storage_offset()) + row * t.stride(0), (1, *t.shape[1:]), tuple(t.stride())))
                else:
                    out.append((t, int(t.storage_offset()), tuple(t.shape), tuple(t.stride())))
    return out


def count_views(tensors: list[torch.Tensor], views: list[tuple[torch.Tensor, int, tuple, tuple]]
                 ) -> tuple[int, dict[int, int]]:
    """The bytes ``tensors`` and ``views`` (tensor viewed, storage offset, shape, stride) hold: each
    distinct view once, at most its storage's size per storage; and ``{storage key: its size}``."""
    seen: dict[int, tuple[int, int, set]] = {}
    for t, offset, shape, stride in [(t, t.storage_offset(), tuple(t.shape), tuple(t.stride())) for t in tensors] + views:
        st = t.untyped_storage()
        key = st.data_ptr() or id(t)
        total, cap, kept = seen.get(key, (0, st.nbytes(), set()))
        if (offset, shape, stride) not in kept:
            kept.add((offset, shape, stride))
            total += math.prod(shape) * t.element_size()
        seen[key] = (total, cap, kept)
    return sum(min(total, cap) for total, cap, _ in seen.values()), {k: cap for k, (_, cap, _) in seen.items()}


#: per batch snapshot: (rows, what one row holds: its bytes and ``{storage key: storage size}``)
_ROW_COUNTS: "weakref.WeakKeyDictionary[Cache, tuple[int, tuple[int, dict[int, int]]]]" = weakref.WeakKeyDictionary()


def row_count(cache: Cache, rows: int) -> tuple[int, dict[int, int]] | None:
    """What any one row of ``cache`` (a batch snapshot ``rows`` wide that no longer changes)
    holds: the bytes of its views (each view once, at most its storage's size per storage) and
    ``{storage key: the storage's size}`` (not to be changed: every row shares it). The same for
    every row, so a batch of 64 forks counts it once, not 64 times (admitting a 16-fork batch
    spent more host time counting rows than the GPU took to run them). None where ``row_views``
    is."""
    known = _ROW_COUNTS.get(cache)
    if known is not None and known[0] == rows:
        return known[1]
    views = row_views(cache, 0, rows)
    if views is None:
        return None
    counted = count_views([], views)
    _ROW_COUNTS[cache] = (rows, counted)
    return counted


def cat_rows(caches: list[Cache], rows: list[int]) -> Cache:
    """One cache holding the rows of ``caches`` in order (``rows[i]`` rows each, same layers and
    lengths): how a batch that ran its step in groups of rows goes on as one batch."""
    new = fork_cache(caches[0])
    for i, layer in enumerate(new.layers):
        for name, t in _tensors(layer):
            parts = [getattr(c.layers[i], name) for c in caches]
            if t.dim() > 0 and all(p.shape[0] == r for p, r in zip(parts, rows)):
                setattr(layer, name, torch.cat(parts, 0))
    return new


def map_cache_tensors(
    cache: Cache, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device | None = None
) -> None:
    """Replace every tensor of every layer by ``fn(tensor)``, in a fixed order; set the layers' device."""
    for layer in cache.layers:
        moved = None
        for name, t in _tensors(layer):
            moved = fn(t)
            setattr(layer, name, moved)
        if device is not None and hasattr(layer, "device") and isinstance(layer.device, torch.device):
            layer.device = moved.device if moved is not None else device  # split models: each layer's own GPU


class CacheMark:
    """A KV cache as it was, to put back exactly: after a failed call (the NaN guard, with the
    run's checkpoint) and after a step whose conditions held (the conditional replay, without).

    A paused run's dynamic cache has a simple shape: the blocks before the pause (and the
    paused block, past ``resid_pre``) hold this step's positions, the blocks after it one
    fewer, and HF's dynamic layers only ever rebind new tensors. So the mark is the list of
    layer objects and two lengths (checked at the ends of both ranges), and a roll-back
    crops each layer back to its length: no walk over the layers and no reference to the
    old tensors while the call runs (at every pause of an armed run, copying each layer's
    state was the pause's largest host cost, growing with depth). Anything else (a step's
    first pass, no checkpoint, lengths not as expected) keeps each append-only layer's
    attributes (the same tensors: nothing is copied) and a deep copy of any other layer
    (``state``).
    """

    __slots__ = ("layers", "split", "lengths", "state")

    def __init__(self, cache: Any, checkpoint: Any = None):
        self.layers = layers = list(cache.layers)  # the layer objects (a CUDA-graph replay replaces some)
        self.split, self.lengths, self.state = 0, (0, 0), None
        n = len(layers)
        if checkpoint is not None and n and set(map(type, layers)) == {DynamicLayer}:
            split = min(checkpoint.layer + (checkpoint.site != "resid_pre"), n)  # blocks holding this step
            done = {layers[0].get_seq_length(), layers[split - 1].get_seq_length()} if split > 0 else set()
            rest = {layers[split].get_seq_length(), layers[-1].get_seq_length()} if split < n else set()
            if len(done) <= 1 and len(rest) <= 1 and 0 not in done | rest:  # 0: a first pass, layers unset
                self.split = split
                self.lengths = (min(done, default=0), min(rest, default=0))
                return
        self.state = [(dict(vars(layer)), None) if type(layer) in _APPEND_ONLY else (None, copy.deepcopy(layer))
                      for layer in layers]

    def restore(self, cache: Any) -> None:
        cache.layers[:] = self.layers
        if self.state is None:
            done, rest = self.lengths
            for i, layer in enumerate(self.layers):
                excess = layer.get_seq_length() - (done if i < self.split else rest)
                if excess > 0:
                    layer.crop(-excess)
            return
        for i, (layer, (attrs, kept)) in enumerate(zip(self.layers, self.state)):
            if attrs is not None:  # append-only: never written in place, so the same tensors
                vars(layer).clear()
                vars(layer).update(attrs)
            else:
                cache.layers[i] = kept
