"""Move a paused run's state between the device and host memory in one copy each way.

A paused run's state is many tensors (two per layer of KV cache, the checkpoint,
the block arguments). Copying them one by one costs a launch and a Python round
per tensor; instead they are packed into one (pinned, when leaving a GPU) host
buffer, and restored with a single host-to-device copy, after which every tensor
is a view into that one device buffer. Restore time then tracks a raw pinned
copy of the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ALIGN = 256  # bytes; keeps every view aligned for any dtype


@dataclass
class HostPack:
    """Tensors packed back to back in one uint8 host buffer."""

    buffer: torch.Tensor
    layout: list[tuple[int, int, torch.dtype, torch.Size]]  # offset, nbytes, dtype, shape

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o : o + n].view(dt).view(shape) for o, n, dt, shape in self.layout]

    def host_views(self) -> list[torch.Tensor]:
        """The packed tensors, as views of the host buffer."""
        return self._views(self.buffer)

    def to_device(self, device: torch.device) -> list[torch.Tensor]:
        """One host-to-device copy; the tensors as views of the device buffer."""
        flat = self.buffer.to(device, non_blocking=True)
        return self._views(flat)


def pack(tensors: list[torch.Tensor], pin: bool) -> HostPack:
    """Copy ``tensors`` into one host buffer (asynchronously from a GPU: synchronize before use)."""
    layout = []
    total = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        layout.append((total, n, t.dtype, t.shape))
        total += -(-n // ALIGN) * ALIGN
    buffer = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    hp = HostPack(buffer, layout)
    for view, t in zip(hp.host_views(), tensors):
        view.copy_(t, non_blocking=pin)
    return hp
