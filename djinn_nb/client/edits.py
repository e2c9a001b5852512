"""What a run's edit, fork and generate calls send: the requests built and checked on this side.

Why apart from ``run.py``: ``Run.resume``, ``edit``, ``fork``, ``fork_many`` and ``step_through``
(and ``Client.generate``'s breakpoints) all build these the same way, before anything is sent: an
``EditRequest`` with its tensors' bytes (inline, or uploaded ahead on the side channel), a
``ForkRequest``, breakpoints as JSON values. They are given the client as a :class:`Sender`: how a
tensor goes ahead, and a run handle's id.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Protocol, Sequence

from ..conditions import parse as parse_condition
from ..errors import ActivationError, BadRequestError, BreakpointError
from ..wire.messages import EditRequest, ForkRequest
from .features import clamp_request

if TYPE_CHECKING:  # pragma: no cover
    import torch  # imported at the first tensor: text-only use never loads it

__all__ = ["FORK_ARGS", "Sender", "edit_request", "fork_request", "plain_breakpoints"]


class Sender(Protocol):
    """What a request needs of the client."""

    def _tensor_in(self, t: torch.Tensor) -> tuple[dict[str, Any], bytes | None]:
        """(spec, inline bytes) for a tensor sent to the server; large ones go ahead on the side channel."""

    def _run_id(self, run: Any) -> Any:
        """A ``Run``'s id; anything else as it is (checked where it is used)."""


def edit_request(
    client: Sender,
    activation: torch.Tensor | None,
    scale: float | None,
    add: torch.Tensor | Sequence[float] | None,
    original: bool = False,
    heads: Sequence[int] | None = None,
    patch_from: Any = None,
    positions: int | Sequence[int] | None = None,
    clamp: Any = None, sae: Any = None,
) -> tuple[EditRequest, bytes | None, bytes | None]:
    """The request plus the inline bytes of its tensors (large ones go ahead on the side channel)."""
    req = EditRequest(original=bool(original), clamp=clamp_request(clamp, sae))
    if patch_from is not None:
        req.patch_from = client._run_id(patch_from)
        if type(req.patch_from) is not str:
            raise ActivationError(f"patch_from must be a Run or a run id, got {type(patch_from).__name__}")
    if positions is not None:
        if isinstance(positions, int) and not isinstance(positions, bool):
            positions = [positions]
        if not isinstance(positions, (list, tuple, range)) or any(type(p) is not int for p in positions):
            raise ActivationError(f"positions must be a list of ints, got {positions!r}"[:200])
        req.positions = list(positions)
    act_bytes = add_bytes = None
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ActivationError(f"scale must be a finite number, got {scale!r}")
        req.scale = float(scale)
    if heads is not None:
        if isinstance(heads, int):
            heads = [heads]
        if not isinstance(heads, (list, tuple, range)) or any(type(h) is not int for h in heads):
            raise ActivationError(f"heads must be a list of ints, got {heads!r}"[:200])
        req.heads = list(heads)
    import torch

    if activation is not None:
        if not isinstance(activation, torch.Tensor):
            raise BadRequestError(f"activation must be a torch.Tensor, got {type(activation).__name__}")
        req.activation, act_bytes = client._tensor_in(activation)
    if add is not None:
        if not isinstance(add, torch.Tensor):
            add = torch.tensor(add, dtype=torch.float32)
        req.add, add_bytes = client._tensor_in(add)
    return req, act_bytes, add_bytes


FORK_ARGS = frozenset({"activation", "scale", "add", "breakpoints", "max_new_tokens", "original", "heads",
                       "patch_from", "positions", "close", "clamp", "sae", "probs_of"})


def fork_request(client: Sender, kw: dict[str, Any]) -> tuple[ForkRequest, bytes | None, bytes | None]:
    """A ``ForkRequest`` from ``Run.fork``'s keyword arguments, plus the inline bytes of its edit's tensors."""
    edit, act, add_b = edit_request(client, kw.get("activation"), kw.get("scale"), kw.get("add"),
                                    bool(kw.get("original", False)), kw.get("heads"), kw.get("patch_from"),
                                    kw.get("positions"), kw.get("clamp"), kw.get("sae"))
    limit, bps = kw.get("max_new_tokens"), kw.get("breakpoints")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise BadRequestError(f"max_new_tokens must be an integer or None, got {limit!r}")
    close = kw.get("close", False)
    if type(close) is not bool:
        raise BadRequestError(f"close must be True or False, got {close!r}"[:200])
    return ForkRequest(edit, None if bps is None else plain_breakpoints(bps), limit, close,
                       token_list(kw.get("probs_of"))), act, add_b


def token_list(tokens: Any) -> list[int] | None:
    """``probs_of``: a token id or a list of them (None: none)."""
    if tokens is None:
        return None
    tokens = [tokens] if isinstance(tokens, int) and not isinstance(tokens, bool) else tokens
    if not isinstance(tokens, (list, tuple)) or not tokens or any(type(t) is not int for t in tokens):
        raise BadRequestError(f"probs_of must be a token id or a non-empty list of token ids, got {tokens!r}"[:200])
    return list(tokens)


def plain_breakpoints(bps: Iterable[Any]) -> list[Any]:
    """Breakpoints as JSON values: ``6``, ``[6, 3]``, ``[6, "all", "mlp_out"]`` or a dict."""
    if isinstance(bps, (int, str, tuple, dict)):
        bps = [bps]
    if not isinstance(bps, (list, set, range)) and not hasattr(bps, "__iter__"):
        raise BreakpointError(f"breakpoints must be a list of layer, (layer, step[, site]) or dict, got {type(bps).__name__}")
    out = []
    for b in bps:
        if isinstance(b, tuple):
            b = list(b)
        if hasattr(b, "as_dict"):
            b = b.as_dict()
        if isinstance(b, dict) and isinstance(b.get("when"), str):
            b = {**b, "when": parse_condition(b["when"])}  # parsed here; the server validates the tree
        out.append(b)
    return out
