"""One loaded model shared by every measurement: an in-process Engine, and an rpyc server on
loopback in front of that same engine with a client connected to it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import Exp3Config


def _dispatch_auto(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Split a model over the visible GPUs the way ``from_pretrained(device_map="auto")`` does."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    max_memory = get_balanced_memory(model, no_split_module_classes=no_split, dtype=dtype)
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    model = dispatch_model(model, device_map=device_map)
    model.hf_device_map = device_map
    return model


def load(cfg: Exp3Config) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer or None, display name) for the config's source, device, dtype and device map.

    ``random:<shape>`` with ``device_map`` is built on the first GPU (or the CPU) and then
    dispatched, since ``djinn_nb.core.models.load_model`` maps only ``from_pretrained`` loads.
    """
    from djinn_nb.core.models import build_random, load_model, resolve_dtype

    source = cfg.model_source
    if cfg.device_map and source and source.startswith("random:"):
        dtype = resolve_dtype(cfg.dtype, "cuda" if torch.cuda.is_available() else "cpu")
        first = "cuda:0" if torch.cuda.is_available() else "cpu"
        model = build_random(source.split(":", 1)[1], first, dtype, cfg.seed)
        return _dispatch_auto(model, dtype), None, source
    loaded = load_model(source, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, device_map=cfg.device_map)
    return loaded.model, loaded.tokenizer, loaded.name


@dataclass
class Session:
    """The engine, the loopback server around it and a client; ``close()`` stops the server."""

    engine: Any
    server: Any
    client: Any
    load_s: float
    extra_clients: list[Any] = field(default_factory=list)

    @property
    def model(self) -> nn.Module:
        return self.engine.model

    def new_client(self) -> Any:
        """A second, independent connection to the same server (for the concurrency demo)."""
        from djinn_nb.client import Client

        c = Client("127.0.0.1", self.server.port)
        self.extra_clients.append(c)
        return c

    def block_devices(self) -> dict[int, str]:
        """The device each decoder block's weights sit on."""
        return {i: str(next(b.parameters()).device) for i, b in enumerate(self.engine.anatomy.blocks)}

    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def close(self) -> None:
        for c in [*self.extra_clients, self.client]:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        self.server.close()


def open_session(cfg: Exp3Config) -> Session:
    """Load the model once; wrap it in an Engine (its exactness probe runs) and serve it on loopback."""
    from djinn_nb.client import Client
    from djinn_nb.core.engine import Engine
    from djinn_nb.serving.server import DjinnServer

    t0 = time.perf_counter()
    model, tokenizer, name = load(cfg)
    engine = Engine(model, tokenizer, name)
    load_s = time.perf_counter() - t0
    server = DjinnServer(engine, "127.0.0.1", 0).start()
    return Session(engine, server, Client("127.0.0.1", server.port), load_s)


def prompt_ids(cfg: Exp3Config, tokenizer: Any, vocab_size: int, alternate: bool = False) -> list[int]:
    """The prompt as token ids: the config's text, or seeded random ids of ``prompt_tokens``.

    A model without a tokenizer and no ``prompt_tokens`` gets 32 random ids.
    ``alternate`` gives a different prompt of the same kind (the concurrent request).
    """
    if cfg.prompt_tokens is None and tokenizer is not None:
        text = "Paris is a city in" if alternate else cfg.prompt
        return list(tokenizer(text)["input_ids"])
    n = cfg.prompt_tokens or 32
    gen = torch.Generator().manual_seed(cfg.seed + (1 if alternate else 0))
    return torch.randint(0, vocab_size, (n,), generator=gen).tolist()


def vocab_size(model: nn.Module) -> int:
    return int(getattr(model.config, "vocab_size", 0)) or model.get_output_embeddings().weight.shape[0]
