"""Move a paused run's state between the device and host memory in one copy per dtype.

A paused run's state is many tensors (two per layer of KV cache, the checkpoint,
the block arguments). Copying them one by one costs a launch and a Python round
per tensor; instead they are packed into one (pinned, when leaving a GPU) host
buffer per dtype, and restored with one host-to-device copy per buffer, after
which every tensor is a view into its device buffer (``split`` makes all views
of a buffer in one call). Restore time then tracks a raw pinned copy of the
same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Group:
    buffer: torch.Tensor  # 1-D, this group's dtype
    device: torch.device  # where the members came from (a model split over GPUs has several)
    numels: list[int]
    shapes: list[torch.Size]
    order: list[int]  # position of each member in the packed list


@dataclass
class HostPack:
    """Tensors packed back to back, one flat host buffer per dtype."""

    groups: list[_Group]
    count: int

    @property
    def nbytes(self) -> int:
        return sum(g.buffer.numel() * g.buffer.element_size() for g in self.groups)

    def _unflatten(self, flats: list[torch.Tensor]) -> list[torch.Tensor]:
        out: dict[int, torch.Tensor] = {}  # original position -> view
        for g, flat in zip(self.groups, flats):
            for i, chunk, shape in zip(g.order, flat.split(g.numels), g.shapes):
                out[i] = chunk.view(shape)
        return [out[i] for i in range(self.count)]

    def host_views(self) -> list[torch.Tensor]:
        """The packed tensors, in their original order, as views of the host buffers."""
        return self._unflatten([g.buffer for g in self.groups])

    @property
    def devices(self) -> set[torch.device]:
        """The devices the packed tensors came from."""
        return {g.device for g in self.groups}

    def to_device(self, device: torch.device | None = None) -> list[torch.Tensor]:
        """One host-to-device copy per (device, dtype): each tensor back to the device it came
        from (``device`` only for a group that came from the host); views of the device buffers."""
        return self._unflatten([
            g.buffer.to(device if g.device.type == "cpu" and device is not None else g.device, non_blocking=True)
            for g in self.groups
        ])


def pack(tensors: list[torch.Tensor], pin: bool) -> HostPack:
    """Copy ``tensors`` into host buffers (asynchronously from a GPU: synchronize
    ``HostPack.devices`` before use), one buffer per (device, dtype)."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        by_kind.setdefault((t.device, t.dtype), []).append(i)
    groups = []
    for (device, dtype), idx in by_kind.items():
        numels = [tensors[i].numel() for i in idx]
        buffer = torch.empty(sum(numels), dtype=dtype, pin_memory=pin)
        group = _Group(buffer, device, numels, [tensors[i].shape for i in idx], idx)
        for chunk, i in zip(buffer.split(numels), idx):
            chunk.view(tensors[i].shape).copy_(tensors[i], non_blocking=pin)
        groups.append(group)
    return HostPack(groups, len(tensors))
