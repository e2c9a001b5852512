"""Counting the rpyc requests a client sends: what a user action costs in round trips.

On loopback a round trip costs ~0.1 ms and nobody notices how many an action makes; through
an SSH tunnel each one is the link's latency. :func:`count_requests` wraps the client's rpyc
``Connection._send`` and counts the request messages it sends (every call, attribute lookup
and netref access is one; replies are not counted), from any thread — the steering slider's
worker included — with the handler of each, so a failing count says what was sent.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from rpyc.core import consts

_HANDLERS = {v: k.removeprefix("HANDLE_").lower() for k, v in vars(consts).items() if k.startswith("HANDLE_")}


@dataclass
class Requests:
    """The requests sent while counting: ``n`` and, per request, its handler (and name, for a
    ``callattr``/``getattr``)."""

    sent: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.sent)

    def __repr__(self) -> str:
        return f"{self.n} requests: {', '.join(self.sent)}"


def _what(args: Any) -> str:
    handler, (label, boxed) = args
    name = _HANDLERS.get(handler, str(handler))
    if handler in (consts.HANDLE_CALLATTR, consts.HANDLE_GETATTR):  # its second argument names the attribute
        items = [v for _, v in boxed] if label == consts.LABEL_TUPLE else list(boxed)
        if len(items) > 1 and isinstance(items[1], str):
            name += f" {items[1]}"
    return name


@contextmanager
def count_requests(client: Any) -> Iterator[Requests]:
    """Count the rpyc requests ``client`` (a ``djinn_nb.Client``) sends inside the block."""
    conn = client._conn
    seen = Requests()
    send = conn._send

    def counting_send(msg: int, seq: int, args: Any) -> None:
        if msg == consts.MSG_REQUEST:
            seen.sent.append(_what(args))
        send(msg, seq, args)

    conn._send = counting_send
    try:
        yield seen
    finally:
        del conn._send  # the class's method again
