"""What a server lets peers and calls cost, and the defaults it derives from the model and the machine.

Why: a shared server must admit every allocation a request can cause before it happens, count it
to the one who asked, and bound it *by default* — a server started with no flags used to let one
client hold +6.3 GB in 31 runs because every byte cap was off. So each cap a flag leaves unset is
derived when the server starts: what runs may hold from the memory the machine has free after the
model loaded (a share of it, so the process and its neighbours keep room), a user's share of that
when several users share the server, a call's steps from the model's positions. A flag's number (or
``none``: no limit, said out loud) overrides a default. :meth:`Limits.describe` is the start-up line
that states every limit and where it came from. An embedded server (a notebook's own) is generous —
its user is the machine's — but never unbounded.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

#: Shares of the memory free at start-up that all runs together may hold.
HOST_SHARE = 0.5  # a CPU server: runs live in host memory beside the model, the OS and other jobs
EMBEDDED_HOST_SHARE = 0.75  # a notebook's own server: its user is the machine's
DEVICE_SHARE = 0.8  # a GPU server: device memory free after the load (the rest: activations, allocator)
OFFLOAD_HOST_SHARE = 0.25  # ... plus host memory for runs offloaded there (pinned)
#: Runs one user may keep at once where the users file gives no ``max_runs``.
USER_MAX_RUNS = 256
EMBEDDED_USER_MAX_RUNS = 4096
#: Steps a call may take where the model states no positions.
DEFAULT_CALL_STEPS = 8192


@dataclass
class Limits:
    """What the server lets peers and calls cost (None: no limit).

    ``user_max_runs`` and ``user_max_held_bytes`` apply to every user the users file gives no
    quota of its own (and to the one anonymous user of a server without tokens). ``basis`` says,
    per derived limit, where its number came from.
    """

    max_connections: int = 256
    max_unauthenticated: int = 64
    hello_seconds: float = 10.0
    max_call_seconds: float | None = 600.0
    max_call_steps: int | None = None
    max_held_bytes: int | None = None  # all runs together, device and host
    user_max_runs: int | None = None
    user_max_held_bytes: int | None = None
    user_max_connections: int | None = None
    user_max_saes: int | None = 16  # SAEs one user may keep loaded (their bytes count with their runs')
    sae_dirs: tuple[str, ...] | None = None  # SAEs load only from under these directories (None: any readable)
    inflight_bytes: int = 2 << 30  # large request frames being received at once
    inflight_wait_s: float = 30.0  # how long a large frame waits for room before its connection is dropped
    auth_failures: int = 20  # per address per minute, then refused for the rest of the minute
    basis: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line stating the limits that bound what runs hold and calls take, and their basis."""
        parts = []
        for name in ("max_held_bytes", "user_max_held_bytes", "user_max_runs", "user_max_connections", "max_call_steps",
                     "max_call_seconds"):
            value = getattr(self, name)
            text = "none" if value is None else human_bytes(value) if name.endswith("bytes") else f"{value:g}"
            why = self.basis.get(name)
            parts.append(f"{name} {text}" + (f" ({why})" if why else ""))
        return "limits: " + ", ".join(parts)


@dataclass(frozen=True)
class Memory:
    """Bytes free on the host and (for a GPU engine) on its device, when the server starts."""

    host_available: int
    device_free: int | None = None

    @staticmethod
    def measure(device: torch.device) -> "Memory":
        free = None
        if device.type == "cuda":
            free = int(torch.cuda.mem_get_info(device)[0])
        return Memory(host_available_bytes(), free)


def host_available_bytes() -> int:
    """MemAvailable (what the kernel could give without swapping), else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def derive_limits(given: dict[str, Any], *, device: torch.device, max_positions: int | None, users: int,
                  embedded: bool = False, memory: Memory | None = None) -> Limits:
    """``Limits`` from the flags ``given`` (a name -> a number, or None for no limit), the rest derived.

    ``users``: how many users the server knows (a user's byte share is derived only when there
    are several). ``memory`` is measured when not given.
    """
    limits = Limits(**given)
    basis: dict[str, str] = {}
    if "max_held_bytes" not in given:
        memory = memory or Memory.measure(device)
        host_share = EMBEDDED_HOST_SHARE if embedded else HOST_SHARE
        if memory.device_free is not None:
            limits.max_held_bytes = int(DEVICE_SHARE * memory.device_free + OFFLOAD_HOST_SHARE * memory.host_available)
            basis["max_held_bytes"] = (f"{DEVICE_SHARE:.0%} of {human_bytes(memory.device_free)} free on {device} "
                                       f"+ {OFFLOAD_HOST_SHARE:.0%} of {human_bytes(memory.host_available)} "
                                       "available host memory")
        else:
            limits.max_held_bytes = int(host_share * memory.host_available)
            basis["max_held_bytes"] = f"{host_share:.0%} of {human_bytes(memory.host_available)} available host memory"
    limits.basis = basis
    reshare(limits, users, set(given))
    if "user_max_runs" not in given:
        limits.user_max_runs = EMBEDDED_USER_MAX_RUNS if embedded else USER_MAX_RUNS
        basis["user_max_runs"] = "default"
    if "max_call_steps" not in given:
        limits.max_call_steps = max_positions or DEFAULT_CALL_STEPS
        basis["max_call_steps"] = "the model's positions" if max_positions else "default"
    return limits


def reshare(limits: Limits, users: int, given: set[str]) -> None:
    """Set the limits that depend on how many users share the server (those not ``given`` by a
    flag): a user's bytes and connections are half the server's when there are several. Called
    at start-up and again when the users file is reloaded."""
    if "user_max_held_bytes" not in given:
        if users >= 2 and limits.max_held_bytes is not None:
            limits.user_max_held_bytes = limits.max_held_bytes // 2
            limits.basis["user_max_held_bytes"] = f"half of max_held_bytes: {users} users share it"
        else:
            limits.user_max_held_bytes = None
            limits.basis["user_max_held_bytes"] = "one user: max_held_bytes bounds it"
    if "user_max_connections" not in given:
        several = users >= 2
        limits.user_max_connections = max(1, limits.max_connections // 2) if several else None
        limits.basis["user_max_connections"] = "half of max_connections" if several else "one user"


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int | None:
    """``"8G"``, ``"512MiB"``, ``"1500000"`` -> bytes; ``"none"`` -> None (no limit)."""
    s = text.strip().lower()
    if s in ("none", "never", "unlimited"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", s)
    if not m:
        raise ValueError(f"a size in bytes (e.g. 2000000, 512M, 8G) or 'none', not {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise ValueError(f"a size must be > 0 (or 'none'), not {text!r}")
    return value


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def kv_bytes_per_position(config: Any, dtype: torch.dtype) -> int:
    """Bytes a run's KV cache grows by per position: keys and values of every layer's KV heads.

    From the model's config (GPT-2, Llama/Mistral/Qwen2, GPT-NeoX names); 0 where it cannot tell,
    so that an estimate never refuses on a guess — the count after the call still bounds it.
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not (isinstance(layers, int) and isinstance(heads, int) and isinstance(hidden, int) and heads > 0):
        return 0
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return 2 * layers * int(kv_heads) * int(head_dim) * torch.empty((), dtype=dtype).element_size()


__all__ = ["Limits", "Memory", "derive_limits", "reshare", "parse_bytes", "human_bytes", "kv_bytes_per_position"]
