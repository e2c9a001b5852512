"""Where paused runs live: on the device, or offloaded to (pinned) host memory; and for how long.

Offload packs a paused run's tensors with :mod:`offload` (one copy per dtype);
restore brings them back before any call that needs them on the device. The
paused-bytes budget offloads the least recently used paused runs; the lease
closes runs nobody has touched for a while. Both walk the registry without
writing any run they do not hold the lock of.
"""
from __future__ import annotations

import time
from typing import Any, Callable, ContextManager

import torch

from . import graphs, offload
from .runs import Run, RunRegistry, map_run_tensors, run_tensors


class Residency:
    """Offload, restore, the budget and leases for one engine's runs."""

    def __init__(self, device: torch.device, device_lock: ContextManager[Any], registry: RunRegistry,
                 drop: Callable[[Run], None]):
        self.device, self._device_lock, self._registry, self._drop = device, device_lock, registry, drop

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def offload(self, run: Run) -> None:
        """Move a paused run, or a finished one's KV cache (its lock held), to host memory; on a CPU
        engine the same packing runs."""
        if run.offloaded:
            return
        t0 = time.perf_counter()
        with self._device_lock:
            hp = offload.pack(run_tensors(run), pin=self._cuda)
            for device in hp.devices:  # every GPU a split model's run has state on
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            views = iter(hp.host_views())
            map_run_tensors(run, lambda _t: next(views), torch.device("cpu"))
            run.host_pack = hp
            if run.checkpoint is not None:
                run.checkpoint.graphs = graphs.TailGraphSlot()  # a graph would pin device memory
            if self._cuda:
                torch.cuda.empty_cache()
        run.timings["offload"] = time.perf_counter() - t0

    def restore(self, run: Run) -> None:
        """Bring an offloaded run (its lock held) back to the device; a no-op when resident."""
        hp = run.host_pack
        if hp is None:  # resident
            return
        t0 = time.perf_counter()
        with self._device_lock:
            devices = hp.devices
            views = iter(hp.to_device(self.device))
            map_run_tensors(run, lambda _t: next(views), self.device)
            for device in devices:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        run.host_pack = None
        run.timings["restore"] = time.perf_counter() - t0

    @staticmethod
    def holds_state(run: Run) -> bool:
        """Paused, or finished with its KV cache kept for rewind, and on the device."""
        return (run.paused or (run.done and run.cache is not None)) and not run.offloaded

    def resident_paused_bytes(self) -> int:
        """Bytes on the device held by paused runs and by finished runs' kept KV caches."""
        return sum(r.bytes_held() for r in self._registry.all() if self.holds_state(r))

    def enforce_budget(self, max_bytes: int, keep: str | None = None) -> list[str]:
        """Offload least-recently-used paused (or finished) runs until their resident state fits ``max_bytes``."""
        moved: list[str] = []
        candidates = sorted(
            (r for r in self._registry.all() if self.holds_state(r) and r.id != keep),
            key=lambda r: r.last_used,
        )
        resident = self.resident_paused_bytes()
        for run in candidates:
            if resident <= max_bytes:
                break
            held = run.bytes_held()
            with run.lock:
                if not self.holds_state(run):
                    continue  # resumed, closed or offloaded meanwhile
                self.offload(run)
            moved.append(run.id)
            resident -= held
        return moved

    def expire(self, lease_seconds: float, hint: str = "") -> list[str]:
        """Close every run nobody has touched for ``lease_seconds``; returns their ids.

        Each is remembered as expired, so its owner is told so; ``hint`` says what sets the lease.
        """
        now = time.monotonic()
        gone = []
        for run in self._registry.all():
            if now - run.last_used > lease_seconds and run.lock.acquire(blocking=False):
                try:
                    self._drop(run)
                    self._registry.expired(run, f"expired after {lease_seconds:g} s idle and was closed"
                                                + (f"; {hint}" if hint else ""))
                    gone.append(run.id)
                finally:
                    run.lock.release()
        if gone and self._cuda:
            torch.cuda.empty_cache()
        return gone

