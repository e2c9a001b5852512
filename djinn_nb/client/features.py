"""Sparse autoencoders from the client: ``client.load_sae``, ``run.features``, and the ``clamp=`` of an edit.

Why apart from ``connection.py`` and ``run.py``: these are one feature's calls, made by
:class:`Saes`, a collaborator each :class:`~djinn_nb.client.connection.Client` holds and is
given only the client's way to call the server (:class:`Calls`); ``client.load_sae``,
``client.saes``, ``client.unload_sae`` and ``run.features`` hand it their arguments. The SAE lives on the server
(read there from a directory on the server's disk, counted to its user); the client holds
a :class:`Sae` handle, and the feature labels if a label file was given (they are read
here: they are for the notebook's tables, never sent).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

from ..errors import BadRequestError, SaeError
from ..wire.calls import (FeaturesReply, FeaturesRequest, LoadSaeRequest, SaeInfo, SaeUnloaded, read_list,
                            read_reply)
from .. import wire

__all__ = ["Calls", "Sae", "Saes", "FeatureRows", "clamp_request", "read_labels"]

MAX_LABEL_FILE = 256 << 20


@dataclass
class Sae:
    """A loaded SAE: its id (what conditions and clamps name), its place, its sizes, its labels."""

    id: str
    layer: int
    site: str
    hook: str
    d_in: int
    d_sae: int
    architecture: str
    k: int | None
    bytes: int
    labels: dict[int, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_info(cls, info: SaeInfo, labels: dict[int, str] | None = None) -> "Sae":
        """The handle of a loaded SAE the server described (``load_sae``, ``saes``)."""
        return cls(info.id, info.layer, info.site, info.hook, info.d_in, info.d_sae, info.architecture, info.k,
                   info.bytes, dict(labels or {}))

    def label(self, feature: int) -> str | None:
        return self.labels.get(feature)


def sae_id(sae: Any) -> str:
    """An SAE handle or its id."""
    if isinstance(sae, Sae):
        return sae.id
    if type(sae) is str and sae:
        return sae
    raise SaeError(f"sae must be a Sae (from client.load_sae) or its id, got {type(sae).__name__}")


def read_labels(labels: Any) -> dict[int, str]:
    """Feature labels from a dict, or a JSON file on this machine: ``{"4123": "text"}``, a list of
    texts (by index), or a list of ``{"index"|"feature": n, "description"|"label": text}``
    (Neuronpedia's export)."""
    if labels is None:
        return {}
    if isinstance(labels, (str, os.PathLike)):
        try:
            if os.path.getsize(labels) > MAX_LABEL_FILE:
                raise SaeError(f"label file {labels!r} is larger than {MAX_LABEL_FILE} bytes")
            with open(labels, encoding="utf-8") as f:
                labels = json.load(f)
        except (OSError, ValueError) as e:
            raise SaeError(f"label file {labels!r}: {e}"[:300]) from None
    out: dict[int, str] = {}
    items: Any = labels.items() if isinstance(labels, Mapping) else enumerate(labels) if isinstance(labels, list) else None
    if items is None:
        raise SaeError("labels must be a dict {feature: text}, a list, or a JSON file of one")
    for key, value in items:
        if isinstance(value, dict):
            key = value.get("index", value.get("feature", key))
            value = value.get("description", value.get("label"))
        try:
            n = int(key)
        except (TypeError, ValueError):
            continue
        if isinstance(value, str):
            out[n] = value
    return out


def clamp_request(clamp: Any, sae: Any) -> dict[str, Any] | None:
    """An edit's ``clamp={feature: value}`` with its ``sae=``, as the wire carries it."""
    if clamp is None:
        if sae is not None:
            raise SaeError("sae= goes with clamp={feature: value, ...}")
        return None
    if sae is None:
        raise SaeError("clamp= sets features of an SAE: pass sae= (a Sae from client.load_sae, or its id)")
    if not isinstance(clamp, Mapping) or not clamp:
        raise SaeError("clamp must be a non-empty dict {feature: value}")
    pairs = []
    for f, v in clamp.items():
        if isinstance(f, bool) or not isinstance(f, int) or isinstance(v, bool) or not isinstance(v, (int, float)) \
                or not math.isfinite(v):
            raise SaeError(f"clamp maps feature ids (ints) to finite numbers, got {f!r}: {v!r}"[:200])
        pairs.append([f, float(v)])
    return {"sae": sae_id(sae), "features": pairs}


class FeatureRows(list):
    """``run.features()``: per position, ``[(feature, activation), ...]``; with ``token_ids``,
    ``tokens`` (texts, with a tokenizer), ``sae`` and ``step``."""

    sae: str = ""
    step: int = 0
    token_ids: list[int]
    tokens: list[str] | None

    def __repr__(self) -> str:
        rows = ",\n ".join("[" + ", ".join(f"({f}, {a:.4g})" for f, a in row) + "]" for row in self)
        return f"[{rows}]"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


class Calls(Protocol):
    """What :class:`Saes` is given of its client: one call to the server, its result or its error raised."""

    def _call(self, name: str, *args: Any) -> Any: ...


class Saes:
    """A connection's SAE calls: load, list, unload, read features (``Client.load_sae``, ``Client.saes``,
    ``Client.unload_sae``, ``Run.features``: the docs are theirs)."""

    def __init__(self, client: Calls):
        self._client = client

    def load(self, path: Any, site: Any = None, id: str | None = None, labels: Any = None) -> Sae:
        if not isinstance(path, (str, os.PathLike)):
            raise SaeError(f"path must be a directory on the server, got {type(path).__name__}")
        if isinstance(site, tuple):
            site = list(site)
        names = read_labels(labels)
        reply = self._client._call("load_sae", wire.dumps(LoadSaeRequest(os.fspath(path), site, id).to_json()))
        return Sae.from_info(read_reply("load_sae", SaeInfo, reply), names)

    def loaded(self) -> list[Sae]:
        return [Sae.from_info(info) for info in read_list("saes", SaeInfo, self._client._call("saes"))]

    def unload(self, sae: Any) -> None:
        read_reply("unload_sae", SaeUnloaded, self._client._call("unload_sae", sae_id(sae)))

    def features(self, run_id: str, sae: Any, k: int | None = 10, ids: Sequence[int] | None = None) -> FeatureRows:
        req = FeaturesRequest(sae_id(sae))
        if ids is not None:
            if isinstance(ids, int):
                ids = [ids]
            if not isinstance(ids, (list, tuple, range)) or any(type(i) is not int for i in ids):
                raise BadRequestError(f"ids must be a list of feature ids, got {ids!r}"[:200])
            req.ids = list(ids)
        else:
            req.k = k
        reply = read_reply("features", FeaturesReply, self._client._call("features", run_id, wire.dumps(req.to_json())))
        rows = FeatureRows([(f, math.nan if a is None else float(a)) for f, a in zip(fs, acts)]
                           for fs, acts in zip(reply.ids, reply.values))
        rows.sae, rows.step = reply.sae, reply.step
        rows.token_ids, rows.tokens = list(reply.token_ids), reply.texts
        return rows
