"""Replay the layers after a checkpoint as one captured CUDA graph.

On an H100, GPT-2's blocks 7..11 and head at 128 tokens need ~0.05 ms of
arithmetic but take ~2.4 ms eagerly: the time goes to launching kernels from
Python. A steering slider forks many times from one checkpoint with the same
shapes, so the second fork captures the remaining layers once as a CUDA graph
and every later fork replays it: copy the (edited) activation into the graph's
input buffer, replay, copy out the logits and the KV entries the graph wrote.

Exactness comes first: the capture is checked against the eager continuation
of the same input, logits and every KV tensor bit for bit, and on any
difference (or if capture fails) the checkpoint stays on the eager path.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import kvcache

#: Eager forks of one checkpoint before its layers are captured.
CAPTURE_AFTER = 1
#: The largest batch of forks whose layers are captured (a graph keeps its batch's KV cache).
MAX_BATCH_CAPTURE = 64


@dataclass
class TailGraphSlot:
    """Shared by a checkpoint and the checkpoints of its forks: the graph, once captured."""

    forks: int = 0
    graph: "TailGraph | None" = None
    disabled: str | None = None  # why the eager path is kept
    replays: int = field(default=0)
    #: batched forks (``fork_many``), by batch size: batches seen, graphs captured, why not
    batches: dict[int, int] = field(default_factory=dict)
    batched: "dict[int, TailGraph]" = field(default_factory=dict)
    batched_disabled: dict[int, str] = field(default_factory=dict)


_swap = kvcache.swap_cache  # the name the GPU tests use


class TailGraph:
    """Blocks ``start..`` plus the head for one checkpoint's shapes, as a CUDA graph."""

    #: what the graph reads by address besides its own inputs, kept alive as long as it (batch.py)
    keep_alive: Any = None

    def __init__(
        self,
        run_tail: Callable[[torch.Tensor, tuple, dict], torch.Tensor],
        start: int,
        hidden: torch.Tensor,
        args: tuple,
        kwargs: dict,
        cache_ref: Any,
        base_cache: Any,
    ):
        """``args``/``kwargs`` refer to ``cache_ref``; the graph runs on forks of ``base_cache``
        (the cache as it was at the checkpoint) instead."""
        self.start = start
        self.static_in = hidden.clone()

        def body(cache: Any) -> torch.Tensor:
            return run_tail(self.static_in, _swap(args, cache_ref, cache), _swap(kwargs, cache_ref, cache))

        side = torch.cuda.Stream(device=hidden.device)
        side.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(side):
            body(kvcache.fork_cache(base_cache))  # warm-up, on a throwaway cache
        torch.cuda.current_stream(hidden.device).wait_stream(side)
        self.cache = kvcache.fork_cache(base_cache)  # what the graph's cache writes land in
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_logits = body(self.cache)

    def replay(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run the captured layers on ``hidden``; returns the graph's logits buffer (copy it)."""
        self.static_in.copy_(hidden)
        self.graph.replay()
        return self.static_logits

    def written_layers(self) -> range:
        return range(self.start, len(self.cache.layers))

    def matches(self, logits: torch.Tensor, cache: Any) -> bool:
        """After ``replay``: are logits and every KV tensor the graph wrote equal to an eager run's?"""
        if not torch.equal(self.static_logits, logits):
            return False
        for i in self.written_layers():
            mine, theirs = vars(self.cache.layers[i]), vars(cache.layers[i])
            for name, t in mine.items():
                if isinstance(t, torch.Tensor) and not torch.equal(t, theirs.get(name)):
                    return False
        return True

    def copy_cache_into(self, cache: Any) -> None:
        """Give ``cache`` its own copies of the KV entries the last replay wrote."""
        for i in self.written_layers():
            layer = copy.copy(self.cache.layers[i])
            for name, t in vars(layer).items():
                if isinstance(t, torch.Tensor):
                    setattr(layer, name, t.clone())
            cache.layers[i] = layer
