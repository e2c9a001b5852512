"""Pause Python's cyclic garbage collector while a model loads.

Importing torch and transformers creates hundreds of thousands of long-lived objects;
each one counts toward the collector's thresholds, so the collector ran about a
thousand times during ``connect()``, its full passes walking the whole growing heap:
0.7 s of a 4 s warm start on two cores, to find ~11,000 objects in cycles (kilobytes).
While a load runs, :func:`paused_gc` turns the collector off; reference counting still
frees everything that is not in a cycle.

Turning it back on alone would only postpone most of the cost: every object made during
the pause is still in the youngest generation, so the next young collection walks them
all (0.15-0.27 s measured after the torch import). So when the pause ends, the young
objects (those made before it too) are moved to the oldest generation with
``gc.freeze()`` then ``gc.unfreeze()`` (the documented pair: freeze moves every tracked
object to the permanent generation, unfreeze puts them all back into the oldest).
Nothing is exempted from collection: cycles made during the pause are freed by the next
full collection, which CPython runs when enough new objects have survived since the
last one; that one pass over the heap is the cost left (0.4-0.6 s measured after the
embedded default's load, against 0.25-0.3 s for a full pass without the pause). Where
the program has frozen objects itself (``gc.get_freeze_count() > 0``), unfreezing would
thaw them too, so the collector is only turned back on.

Cycles made during a pause keep what they hold until that full collection: ~110 MB after
the embedded model's GGUF conversion, tensors on a GPU perhaps after a large model's
load. So a pause that took more CPU time than :data:`LONG_PAUSE_S` (a conversion, a large
model) ends with one full collection instead, which frees them at once and costs little
beside such a load; the warm start of the embedded default (~3 s) promotes. No torch
import here: ``djinn_nb`` uses this before torch loads.
"""
from __future__ import annotations

import gc
import threading
import time
from contextlib import contextmanager
from typing import Iterator

_lock = threading.Lock()
_depth = 0  # pauses in progress, all threads
_enabled_before = False  # whether the collector was on when the outermost pause began
_began = 0.0  # the process's CPU time when the outermost pause began

#: a pause in which the process used more CPU seconds than this ends with a full collection, not a
#: promotion (CPU rather than wall time: a warm start on a busy machine takes 5-10 s of wall time)
LONG_PAUSE_S = 10.0


@contextmanager
def paused_gc() -> Iterator[None]:
    """Turn the cyclic collector off for the ``with`` block; nested and concurrent pauses
    share one pause, and the collector comes back on when the last ends if it was on when
    the first began (a collector the caller had disabled stays disabled), with what was
    made meanwhile in its oldest generation, or collected after a pause longer than
    :data:`LONG_PAUSE_S`."""
    global _depth, _enabled_before, _began
    with _lock:
        if _depth == 0:
            _enabled_before = gc.isenabled()
            _began = time.process_time()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _enabled_before:
                if time.process_time() - _began > LONG_PAUSE_S:
                    gc.collect()
                elif gc.get_freeze_count() == 0:
                    gc.freeze()
                    gc.unfreeze()
                gc.enable()
