"""What the calls around the runs take and answer, typed: the grids (causal trace, attribution
patching), SAEs and their features, batched decoding and token probabilities, the lens grid,
side-channel reservations, and what closing a run or unloading an SAE acknowledges.

Why apart from ``messages.py``: that module holds the runs' own messages (briefs, summaries,
listings, edits and forks) and is near its size limit; these are the requests and replies of the
calls added around them, in the same vocabulary: each a :class:`~djinn_nb.wire.typed.Message`
dataclass whose fields are annotated once. A reply is built on the server (``Cls(...).to_json()``,
the same keys the wire always carried) and read on the client through
:func:`read_reply`/:func:`read_list`, so a malformed reply is a ``ProtocolError`` naming the call,
never a ``KeyError`` deep in a caller. A request is read on the server through ``Cls.from_json``
(unknown keys, missing or mistyped fields refused by name); what a field's items mean (a layer
in range, a token id in the vocabulary) is checked where it is used, as before.
No torch, no rpyc: both ends of the wire import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import BadRequestError, ProtocolError
from .typed import Message, fail

__all__ = ["AttributionReply", "AttributionRequest", "CausalTraceReply", "CausalTraceRequest", "ClosedReply",
           "DecodeManyReply", "DecodeManyRequest", "ExpectReply", "FeaturesReply", "FeaturesRequest",
           "LensGridRequest", "LoadSaeRequest", "SaeInfo", "SaeUnloaded", "TokenProbsRequest", "read_list",
           "read_reply"]

M = TypeVar("M", bound=Message)


def read_reply(call: str, cls: type[M], obj: Any) -> M:
    """``obj`` (call ``call``'s result) as a ``cls``, or a ``ProtocolError`` naming the call and the field."""
    try:
        return cls.from_json(obj)
    except BadRequestError as e:
        raise ProtocolError(f"{call}: {e}") from None


def read_list(call: str, cls: type[M], obj: Any) -> list[M]:
    """A list reply of ``cls`` items, each read as :func:`read_reply` reads one."""
    if type(obj) is not list:
        raise ProtocolError(f"{call}: expected a list of {cls.__name__}, got {type(obj).__name__}")
    return [read_reply(call, cls, item) for item in obj]


def _ints(values: Any) -> bool:
    return type(values) is list and all(type(v) is int for v in values)


def _numbers(values: Any, null: bool = False) -> bool:
    return type(values) is list and all(type(v) in (int, float) or (null and v is None) for v in values)


def _texts_ok(cls: type, text_ids: list[int], texts: list[str]) -> None:
    if not _ints(text_ids) or len(texts) != len(text_ids) or not all(type(t) is str for t in texts):
        raise fail(cls, "text_ids and texts must be equal-length lists of ints and strings")


@dataclass
class ClosedReply(Message):
    """``close``: the run freed (``state`` is always ``"closed"``)."""

    id: str
    state: str = "closed"

    def __post_init__(self) -> None:
        if self.state != "closed":
            raise fail(type(self), f"state must be 'closed', got {self.state!r}"[:120])


@dataclass
class SaeUnloaded(Message):
    """``unload_sae``: the SAE freed (``state`` is always ``"unloaded"``)."""

    id: str
    state: str = "unloaded"

    def __post_init__(self) -> None:
        if self.state != "unloaded":
            raise fail(type(self), f"state must be 'unloaded', got {self.state!r}"[:120])


@dataclass
class ExpectReply(Message):
    """``expect``: where and with which ticket to upload a tensor on the side channel."""

    port: int
    ticket: str


@dataclass
class DecodeManyReply(Message):
    """``decode_many``: the text of each sequence, and of each token on its own, in the order sent."""

    sequences: list[str]
    tokens: list[str]

    def __post_init__(self) -> None:
        if not all(type(t) is str for t in self.sequences + self.tokens):
            raise fail(type(self), "sequences and tokens must be lists of strings")


@dataclass
class SaeInfo(Message):
    """``load_sae`` (and each item of ``saes``): a loaded SAE's id, place, hook name, sizes,
    architecture, ``k`` (top-k SAEs; else null) and the bytes its weights hold."""

    id: str
    layer: int
    site: str
    d_in: int
    d_sae: int
    architecture: str
    k: int | None
    bytes: int
    hook: str


@dataclass
class FeaturesReply(Message):
    """``features``: at a pause at the SAE's place (``sae``, ``layer``, ``site``, ``step``), per
    position the feature ids and their activations (``ids``/``values``, rows of equal length; a
    non-finite activation crosses as null, read as NaN), and the positions' token ids (``[]``
    where they cannot be paired) and texts (with a tokenizer)."""

    sae: str
    layer: int
    site: str
    step: int
    ids: list[list[int]]
    values: list[list[Any]]  # numbers, or null where not finite
    token_ids: list[int]
    texts: list[str] | None

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.values) or not all(
                _ints(i) and _numbers(v, null=True) and len(i) == len(v) for i, v in zip(self.ids, self.values)):
            raise fail(type(self), "ids and values must be equal-shaped lists of rows (ints, numbers or nulls)")
        if not _ints(self.token_ids) or (self.texts is not None and (
                len(self.texts) != len(self.token_ids) or not all(type(t) is str for t in self.texts))):
            raise fail(type(self), "token_ids must be a list of ints, texts null or one string per token id")


@dataclass
class CausalTraceReply(Message):
    """``causal_trace``: ``rows[i][j]``, p(answer) with the clean activation restored at
    (``layers[i]``, column j), null for a cell not computed; the columns are ``positions``, or
    ``heads`` at site z. Both runs' own p(answer), the answer, the clean prompt's ids, and the
    texts of the tokens a plot labels (``text_ids``/``texts``, with a tokenizer)."""

    rows: list[list[Any]]  # numbers, or null for a cell not computed
    clean_prob: float | None
    corrupt_prob: float | None
    answer: int
    layers: list[int]
    positions: list[int]
    heads: list[int]
    clean_ids: list[int]
    text_ids: list[int]
    texts: list[str]

    def __post_init__(self) -> None:
        _grid_ok(self, self.rows)


@dataclass
class AttributionReply(Message):
    """``attribution_patching``: ``rows[i][j]``, the estimated change of ``metric`` when cell
    (``layers[i]``, column j) is patched; the metric in both runs, both runs' p(answer), the
    answer, the foil (``logit_diff``'s other token) and the rest as :class:`CausalTraceReply`."""

    rows: list[list[Any]]  # numbers, or null for a cell not computed
    metric: str
    clean_metric: float | None
    corrupt_metric: float | None
    clean_prob: float | None
    corrupt_prob: float | None
    answer: int
    foil: int | None
    layers: list[int]
    positions: list[int]
    heads: list[int]
    clean_ids: list[int]
    text_ids: list[int]
    texts: list[str]

    def __post_init__(self) -> None:
        _grid_ok(self, self.rows)


def _grid_ok(reply: CausalTraceReply | AttributionReply, rows: list[Any]) -> None:
    cls = type(reply)
    if not all(_ints(getattr(reply, name)) for name in ("layers", "positions", "heads", "clean_ids")):
        raise fail(cls, "layers, positions, heads and clean_ids must be lists of ints")
    if len(rows) != len(reply.layers) or not all(_numbers(row, null=True) for row in rows):
        raise fail(cls, f"rows must be {len(reply.layers)} rows (one per layer) of numbers or nulls")
    _texts_ok(cls, reply.text_ids, reply.texts)


# ----- requests ---------------------------------------------------------------------------
@dataclass
class CausalTraceRequest(Message):
    """``causal_trace``: the clean and corrupted prompts (texts or ids), the answer (an id, the text
    of one token, or null: the clean run's greedy next token), layers and positions (null: all),
    the site, ``heads`` ("all", a list or null: site z) and ``cells`` ([layer, column] pairs or null)."""

    clean: str | list[int]
    corrupted: str | list[int]
    answer: int | str | None = None
    layers: list[int] | None = None
    positions: list[int] | None = None
    site: str = "resid_post"
    heads: str | list[int] | None = None
    cells: list[Any] | None = None


@dataclass
class AttributionRequest(Message):
    """``attribution_patching``: as :class:`CausalTraceRequest` (no cells), and the ``metric``
    (``logit_diff`` or ``prob``) and ``foil`` (``logit_diff``'s other token; null: the default)."""

    clean: str | list[int]
    corrupted: str | list[int]
    answer: int | str | None = None
    layers: list[int] | None = None
    positions: list[int] | None = None
    site: str = "resid_post"
    heads: str | list[int] | None = None
    metric: str = "logit_diff"
    foil: int | None = None


@dataclass
class LoadSaeRequest(Message):
    """``load_sae``: a directory on the server, the site (``[layer, site]``, a hook name, or null:
    the cfg's hook) and the id (null: ``saeN``)."""

    path: str
    site: str | list[Any] | None = None
    id: str | None = None


@dataclass
class FeaturesRequest(Message):
    """``features``: an SAE id and either ``k`` (the top-k features per position) or ``ids``."""

    sae: str
    k: int | None = None
    ids: list[int] | None = None


@dataclass
class DecodeManyRequest(Message):
    """``decode_many``: sequences of token ids, each decoded whole, and token ids decoded one by one."""

    sequences: list[list[int]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


@dataclass
class TokenProbsRequest(Message):
    """``token_probs``: run ids, and the token whose probability each run gives at its last step."""

    runs: list[str]
    token: int


@dataclass
class LensGridRequest(Message):
    """``lens_grid``: a prompt (text or ids), the top ``k`` per cell, and the site."""

    prompt: str | list[int]
    k: int = 1
    site: str = "resid_post"
