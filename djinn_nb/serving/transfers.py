"""Tensors in and out of a connection's calls: inline (a header and bytes), or on the side channel.

Why a module of its own: a tensor reaches a call in one of two forms (sent inline beside the
request, or uploaded ahead with a ticket ``expect`` reserved) and leaves in one of two (inline,
or offered on the side channel when the client asks and it is large); every call that takes or
gives one goes through :class:`Transfers`, given the caller (a
:class:`~djinn_nb.serving.parts.Caller`: uploads and downloads belong to their user, and a
reservation counts to its user's bytes like a run).
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import BadRequestError
from ..wire.calls import ExpectReply
from .. import wire
from ..wire import sidechannel
from .parts import Caller

__all__ = ["Transfers"]


class Transfers:
    """``expect``; ``take`` and ``send`` for the other calls (implements :class:`~djinn_nb.serving.parts.Tensors`).
    ``key`` names the connection to the side channel."""

    def __init__(self, caller: Caller, key: int):
        self._caller = caller
        self._key = key

    def take(self, meta: Any, data: Any, what: str) -> torch.Tensor | None:
        """A tensor sent inline (header + bytes) or uploaded on the side channel ({"ticket"})."""
        state = self._caller.state
        if meta is None:
            if data is not None:
                raise BadRequestError(f"{what} bytes were sent without an {what} header")
            return None
        if isinstance(meta, dict) and set(meta) == {"ticket"}:
            if state.bulk is None or data is not None:
                raise BadRequestError(f"{what}: a side-channel ticket comes alone, to a server with a side channel")
            return state.bulk.take(meta["ticket"], self._caller.who())
        return wire.decode_tensor(meta, data, state.max_payload)

    def send(self, t: torch.Tensor, bulk: Any) -> Any:
        """A tensor for the client: inline, or (asked for, and large) offered on the side channel."""
        if type(bulk) is not bool:
            raise BadRequestError("bulk must be true or false")
        nbytes = t.numel() * t.element_size()
        channel = self._caller.state.bulk
        if bulk and channel is not None and nbytes >= sidechannel.BULK_THRESHOLD:
            return {"bulk": channel.offer(t, self._caller.who(), self._key)}
        return wire.encode_tensor(t)

    # ----- calls (the service's exposed_<name>) -------------------------------------
    def expect(self, meta_json: Any) -> dict[str, Any]:
        """Reserve a side-channel upload of a tensor with this header; returns {port, ticket}."""
        state = self._caller.state
        if state.bulk is None:
            raise BadRequestError("this server has no side channel")
        meta = wire.loads(meta_json, "tensor header")
        _, _, nbytes = wire.check_header(meta, state.max_payload)
        self._caller.check_bytes(self._caller.who(), adding=nbytes)  # a reservation counts to its user, like a run
        return ExpectReply(**state.bulk.expect(meta, state.max_payload, self._caller.who(), self._key)).to_json()
