"""A djinn server over a tiny random GPT-2, started in-process for wire, security and concurrency tests."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import rpyc

from djinn_nb import wire
from djinn_nb.core.engine import Engine
from djinn_nb.core.models import build_random
from djinn_nb.wire.protocol import PROTOCOL
from djinn_nb.serving.server import DjinnServer
from djinn_nb.wire.transport import open_connection
from djinn_nb.core.reference import generate

PROMPT = [5, 17, 42, 99, 3, 250, 11, 7]
NEW_TOKENS = 6


@dataclass
class Served:
    server: DjinnServer
    engine: Engine
    reference: list[int]  # greedy tokens of plain HF generate for PROMPT

    @property
    def port(self) -> int:
        return self.server.port


def serve(token: str | None = None, **kwargs: Any) -> Served:
    """A started server on 127.0.0.1 (any free port) with the reference tokens of its model."""
    model = build_random("gpt2-tiny", seed=7)
    reference = generate(model, PROMPT, NEW_TOKENS)
    engine = Engine(model, None, "gpt2-tiny")
    return Served(DjinnServer(engine, "127.0.0.1", 0, token=token, **kwargs).start(), engine, reference)


def raw_connection(port: int, token: str | None = None, hello: bool = True) -> rpyc.Connection:
    """An rpyc connection that speaks to the exposed calls directly (no Client checks in between)."""
    conn = open_connection("127.0.0.1", port)
    if hello:
        reply(conn.root.hello(PROTOCOL, token))
    return conn


def reply(raw: Any) -> Any:
    """The parsed reply of an exposed call: ``{"ok": ..., ...}`` (the payload of a tuple reply dropped)."""
    if isinstance(raw, tuple):
        raw = raw[0]
    return wire.loads(raw, "reply")


def where(conn: rpyc.Connection, run_id: str) -> tuple[str, Any, int, list[int]]:
    """(state, layer, step, token ids) of a run, as its owner sees it."""
    s = reply(conn.root.summary(run_id))["result"]
    return s["state"], s["layer"], s["step"], s["token_ids"]
