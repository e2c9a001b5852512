"""How a typed message is checked: ``from_json``/``to_json`` for a dataclass of plain JSON values.

Why apart from ``messages.py`` and ``calls.py``: those are the vocabulary (which messages cross the wire, and
their fields); this is the one way each is read. A message's checks come from its fields' own
annotations — ``int``, ``float`` (an int is accepted), ``str``, ``bool``, ``list[...]``,
``dict[...]``, a union of those, ``| None`` for a field that may be null; any other type is
the class's own to check (``__post_init__``) — so a field's type is stated once. A message
refuses unknown and missing fields, wrong types and non-finite numbers with a
``BadRequestError`` naming the class and the field. No torch, no rpyc.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, ClassVar, Union

from ..errors import BadRequestError

__all__ = ["Message", "check", "fail"]

#: what a field's annotated type accepts from JSON
_KINDS: dict[Any, tuple[type, ...]] = {int: (int,), float: (int, float), str: (str,), bool: (bool,), list: (list,),
                                       dict: (dict,)}


def fail(cls: type, message: str) -> BadRequestError:
    return BadRequestError(f"{cls.__name__}: {message}"[:300])


def check(cls: type, name: str, value: Any, kinds: tuple, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        want = "/".join(k.__name__ for k in kinds) + (" or null" if optional else "")
        raise fail(cls, f"{name} must be {want}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise fail(cls, f"{name} must be finite")
    return value


def _kinds(hint: Any) -> tuple[tuple[type, ...] | None, bool]:
    """What a field of type ``hint`` accepts (None: its class checks it) and whether it may be null."""
    union = typing.get_origin(hint) in (Union, types.UnionType)
    members = typing.get_args(hint) if union else (hint,)
    kinds: list[type] = []
    for member in members:
        if member is not type(None):
            accepted = _KINDS.get(typing.get_origin(member) or member)
            if accepted is None:
                return None, type(None) in members
            kinds += [k for k in accepted if k not in kinds]
    return tuple(kinds), type(None) in members


#: a message class's field names, and ``(name, required, kinds, optional)`` per field
_Spec = tuple[frozenset[str], tuple[tuple[str, bool, "tuple | None", bool], ...]]


class Message:
    """``from_json``/``to_json`` for a dataclass whose fields are plain JSON values."""

    #: what ``_spec`` worked out, in each class's own ``__dict__`` (never inherited)
    _spec_cache: ClassVar[_Spec]

    @classmethod
    def _spec(cls) -> _Spec:
        """Field names and ``(name, required, kinds, optional)`` per field, worked out once per class."""
        spec = cls.__dict__.get("_spec_cache")
        if spec is None:
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"{cls.__name__} is a message only as a dataclass")
            fields, hints = dataclasses.fields(cls), typing.get_type_hints(cls)
            spec = (frozenset(f.name for f in fields), tuple(
                (f.name, f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                 *_kinds(hints[f.name])) for f in fields))
            cls._spec_cache = spec
        return spec

    @classmethod
    def from_json(cls, obj: Any):
        if not isinstance(obj, dict):
            raise fail(cls, f"expected an object, got {type(obj).__name__}")
        names, spec = cls._spec()
        if not names.issuperset(obj):
            raise fail(cls, f"unknown field(s) {sorted(map(str, set(obj) - names))}; known: {sorted(names)}")
        values = {}
        for name, required, kinds, optional in spec:
            if name not in obj:
                if required:
                    raise fail(cls, f"missing field {name!r}")
                continue
            values[name] = obj[name] if kinds is None else check(cls, name, obj[name], kinds, optional)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name, *_ in self._spec()[1]}
