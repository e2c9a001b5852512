"""Parse the argument line of a djinn magic: ``key=value`` words, then free text.

Leading words of the form ``key=value``, ``--key=value`` or ``--key value`` are
options; whatever follows is the free text (a prompt, an address). Values may be
quoted. A value of ``None`` or an empty value counts as not given, so that a
notebook parameter that is ``None`` can be passed as ``model={model}``.
Errors are :class:`ArgError` with one line that says what to write instead.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = ["ArgError", "Parsed", "parse", "parse_prompt", "integer", "number", "text", "flag", "step_value", "int_list"]

Converter = Callable[[str, str], Any]

_VALUE = r"(\"(?:[^\"\\]|\\.)*\"|'[^']*'|\S*)"
_KEY_EQ = re.compile(r"\s*(?:--)?([A-Za-z_]\w*)=" + _VALUE + r"(?=\s|$)")
_DASH_KEY = re.compile(r"\s*--([A-Za-z_]\w*)(?=\s|$)")
_WORD = re.compile(r"\s*(\S+)")
_NEXT_WORD = re.compile(r"\s+" + _VALUE.replace(r"\S*", r"\S+") + r"(?=\s|$)")


class ArgError(ValueError):
    """A mistake in a magic's arguments; the message names the fix."""


@dataclass
class Parsed:
    options: dict[str, Any]
    rest: str


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        try:
            return str(ast.literal_eval(raw))
        except (ValueError, SyntaxError):
            return raw[1:-1]
    return raw


def integer(key: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ArgError(f"{key} must be an integer, e.g. {key}=6 (got {raw!r})") from None


def number(key: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ArgError(f"{key} must be a number, e.g. {key}=0.9 (got {raw!r})") from None


def text(key: str, raw: str) -> str:
    return raw


def flag(key: str, raw: str) -> bool:
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ArgError(f"{key} must be true or false, e.g. {key}=false (got {raw!r})")


def step_value(key: str, raw: str) -> int | str:
    """A generation step: an integer >= 0 or ``all``."""
    if raw.lower() == "all":
        return "all"
    value = integer(key, raw)
    if value < 0:
        raise ArgError(f"{key} must be >= 0 or 'all', e.g. {key}=0 (the prompt pass) (got {raw!r})")
    return value


def int_list(key: str, raw: str) -> list[int]:
    """Integers separated by commas: ``1,3`` (or ``[1, 3]``, or one integer)."""
    body = raw.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    parts = [x.strip() for x in body.split(",")]
    try:
        values = [int(x) for x in parts]
    except ValueError:
        raise ArgError(f"{key} must be integers separated by commas, e.g. {key}=1,3 (got {raw!r})") from None
    if any(v < 0 for v in values):
        raise ArgError(f"{key} must be integers >= 0, e.g. {key}=1,3 (got {raw!r})")
    return values


def parse(line: str, spec: Mapping[str, Converter], magic: str, anywhere: bool = False) -> Parsed:
    """Split ``line`` into the options named in ``spec`` (converted) and the free text.

    The options lead and the free text follows them; with ``anywhere``, options and
    free words may mix (``%djinn_connect host:port token=...``).
    """
    options: dict[str, Any] = {}
    words: list[str] = []
    pos = 0
    while True:
        m = _KEY_EQ.match(line, pos)
        if m:
            key, raw, pos = m.group(1), m.group(2), m.end()
        else:
            m = _DASH_KEY.match(line, pos)
            if not m:
                word = _WORD.match(line, pos) if anywhere else None
                if word is None:
                    break
                words.append(word.group(1))
                pos = word.end()
                continue
            key, pos = m.group(1), m.end()
            nxt = _NEXT_WORD.match(line, pos)
            if spec.get(key) is flag and not (nxt and nxt.group(1).lower() in ("true", "false", "1", "0")):
                raw = "true"
            elif nxt:
                raw, pos = nxt.group(1), nxt.end()
            else:
                raise ArgError(f"--{key} needs a value: write {key}=VALUE")
        if key not in spec:
            known = ", ".join(f"{k}=" for k in spec) or "no options"
            raise ArgError(f"unknown key {key!r} for %{magic}: it takes {known}")
        if key in options:
            raise ArgError(f"{key} is given twice: keep one {key}=...")
        raw = _unquote(raw)
        if raw in ("", "None"):
            continue
        options[key] = spec[key](key, raw)
    return Parsed(options, " ".join([*words, line[pos:].strip()]).strip())


def parse_prompt(raw: str, magic: str = "djinn_run") -> str | list[int]:
    """Free text as a prompt: ``[1, 2, 3]`` is a list of token ids, a quoted string is unquoted."""
    raw = raw.strip()
    if not raw:
        raise ArgError(f"no prompt: write %{magic} max_new_tokens=20 The capital of France is")
    if raw.startswith("[") and raw.endswith("]"):
        try:
            ids = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            ids = None
        if isinstance(ids, list) and ids and all(type(i) is int for i in ids):
            return ids
        raise ArgError(f"a token-id prompt is a list of integers, e.g. [1, 2, 3] (got {raw[:40]!r})")
    return _unquote(raw)
