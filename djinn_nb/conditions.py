"""Conditions of conditional breakpoints: a small language, parsed into a JSON tree, never evaluated as code.

``when="entropy > 2.5 and step >= 3"`` is parsed here, on the client, by a
recursive-descent parser into a tree of plain values; the server validates
the tree again (:func:`check_tree`) and evaluates it itself over numbers it
computed (:func:`evaluate`). Nothing the user writes reaches ``eval`` on either
side, so ``__import__('os')`` is a syntax error like any other.

Grammar::

    expr   := and ("or" and)*
    and    := not ("and" not)*
    not    := "not" not | atom
    atom   := "(" expr ")" | TERM CMP value | TERM ["not"] "in" "[" value ("," value)* "]"
    TERM   := top1_prob | entropy | token | norm | step | feature "(" SAE_ID "," INT ")"
    CMP    := < | <= | > | >= | == | !=
    value  := number | "quoted text" (token only, with == != in: a text of one token)

A token's text is resolved to its id where the breakpoint is set, with the
model's own tokenizer (:func:`resolve_texts`): the tree then holds
``{"text": " Paris", "id": 7042}``, and the server compares ids. A text that is
not exactly one token, or a model without a tokenizer, is an error there, never
a condition that silently never holds. Texts are not ordered: ``token < " a"``
is an error when it is parsed.

``feature(res8, 4123)`` names feature 4123 of the SAE loaded as ``res8`` (an id, bare or
quoted); the server checks, where the breakpoint is set, that its owner has that SAE, at the
breakpoint's layer and site, with that feature (:mod:`djinn_nb.core.features`).

Trees: ``{"and": [t, ...]}``, ``{"or": [...]}``, ``{"not": t}``,
``{"term": "feature", "sae": "res8", "feature": 4123, "op": ">", "value": 6}``,
``{"term": "entropy", "op": ">", "value": 2.5}``,
``{"term": "token", "op": "in", "values": [42, {"text": " Paris"}]}``.
This module is shared vocabulary (no torch, no rpyc); every layer may use it.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

from .errors import BreakpointError

TERMS = {
    "top1_prob": "the probability of the most likely next token at the step examined",
    "entropy": "the entropy (nats) of the step's next-token distribution",
    "token": "the token the step chose (an id, or a text of one token in quotes)",
    "norm": "the largest per-position L2 norm of the activation at the breakpoint's site",
    "step": "the generation step (0 is the prompt pass)",
    "feature": "feature(sae, n): the largest activation over the step's positions of feature n of a loaded SAE, "
               "at the breakpoint's site",
}
SAE_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")
COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}
TEXT_COMPARISONS = ("==", "!=", "in")  # a token's text is equal or not; it has no order
MAX_SOURCE = 1000
MAX_NODES = 200
MAX_DEPTH = 32

_TOKEN = re.compile(r"""\s*(?:
    (?P<num>-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<op><=|>=|==|!=|<|>|\(|\)|\[|\]|,)
  | (?P<word>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<bad>\S)
)""", re.VERBOSE)
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'"}


def _lex(source: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(source):
        m = _TOKEN.match(source, pos)
        if m is None or m.end() == pos:  # only trailing whitespace is left
            break
        kind = m.lastgroup
        assert kind is not None, "every alternative of _TOKEN is a named group"
        if kind == "bad":
            raise BreakpointError(f"condition {source!r}: unexpected character {m.group(kind)!r} at {m.start(kind)}")
        tokens.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return tokens


def _unquote(text: str) -> str:
    body, out, i = text[1:-1], [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            out.append(_ESCAPES.get(body[i + 1], body[i + 1]))
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


class _Parser:
    def __init__(self, source: str):
        self.source = source
        self.tokens = _lex(source)
        self.i = 0

    def fail(self, why: str) -> BreakpointError:
        where = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.source)
        return BreakpointError(f"condition {self.source!r}: {why} at {where}"[:400])

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, kind: str | None = None, text: str | None = None) -> tuple[str, str, int] | None:
        tok = self.peek()
        if tok is None or (kind and tok[0] != kind) or (text and tok[1] != text):
            return None
        self.i += 1
        return tok

    def parse(self) -> dict[str, Any]:
        if not self.tokens:
            raise BreakpointError("condition is empty")
        tree = self.expr(0)
        tok = self.peek()
        if tok is not None:
            raise self.fail(f"unexpected {tok[1]!r}")
        return tree

    def expr(self, depth: int) -> dict[str, Any]:
        if depth > MAX_DEPTH:
            raise self.fail("nested too deeply")
        parts = [self.conj(depth)]
        while self.take("word", "or"):
            parts.append(self.conj(depth))
        return parts[0] if len(parts) == 1 else {"or": parts}

    def conj(self, depth: int) -> dict[str, Any]:
        parts = [self.neg(depth)]
        while self.take("word", "and"):
            parts.append(self.neg(depth))
        return parts[0] if len(parts) == 1 else {"and": parts}

    def neg(self, depth: int) -> dict[str, Any]:
        if self.take("word", "not"):
            return {"not": self.neg(depth + 1)}
        return self.atom(depth)

    def atom(self, depth: int) -> dict[str, Any]:
        if self.take("op", "("):
            tree = self.expr(depth + 1)
            if not self.take("op", ")"):
                raise self.fail("expected ')'")
            return tree
        tok = self.take("word")
        if tok is None:
            raise self.fail("expected a term (" + ", ".join(TERMS) + ")")
        term = tok[1]
        if term not in TERMS:
            raise BreakpointError(f"condition {self.source!r}: unknown term {term!r}; known: {', '.join(TERMS)}"[:400])
        where = self.feature_args() if term == "feature" else {}
        negate = bool(self.take("word", "not"))
        if self.take("word", "in"):
            if not self.take("op", "["):
                raise self.fail("expected '[' after 'in'")
            values = [self.value(term)]
            while self.take("op", ","):
                values.append(self.value(term))
            if not self.take("op", "]"):
                raise self.fail("expected ']'")
            node = {"term": term, **where, "op": "in", "values": values}
            return {"not": node} if negate else node
        if negate:
            raise self.fail("expected 'in' after 'not'")
        op = self.take("op")
        if op is None or op[1] not in COMPARISONS:
            raise self.fail("expected one of < <= > >= == != or in")
        value = self.value(term)
        if isinstance(value, dict) and op[1] not in TEXT_COMPARISONS:
            self.i -= 1
            raise self.fail(f"a token's text compares only with == != or in (texts have no order), not {op[1]}")
        return {"term": term, **where, "op": op[1], "value": value}

    def feature_args(self) -> dict[str, Any]:
        """``(sae id, feature)`` after the word ``feature``."""
        if not self.take("op", "("):
            raise self.fail("expected '(' after feature: feature(sae id, feature number)")
        tok = self.take("word") or self.take("str")
        sae = None if tok is None else tok[1] if tok[0] == "word" else _unquote(tok[1])
        if sae is None or not SAE_ID.fullmatch(sae):
            raise self.fail("expected an SAE id (a letter or _, then letters, digits or _)")
        num = self.take("op", ",") and self.take("num")
        if not num or not re.fullmatch(r"\d{1,9}", num[1]):
            raise self.fail("expected ', feature number' (an integer >= 0)")
        if not self.take("op", ")"):
            raise self.fail("expected ')'")
        return {"sae": sae, "feature": int(num[1])}

    def value(self, term: str) -> Any:
        tok = self.take("num") or self.take("str")
        if tok is None:
            raise self.fail("expected a number" + (" or a quoted token text" if term == "token" else ""))
        if tok[0] == "str":
            if term != "token":
                raise self.fail(f"{term} compares with numbers, not text")
            return {"text": _unquote(tok[1])}
        if re.fullmatch(r"-?\d+", tok[1]):
            return int(tok[1])
        number = float(tok[1])
        if not math.isfinite(number):
            raise self.fail(f"{tok[1]} is not a finite number")
        return number


def parse(source: str) -> dict[str, Any]:
    """The JSON tree of a condition; ``BreakpointError`` naming what is wrong."""
    if not isinstance(source, str):
        raise BreakpointError(f"a condition is text, got {type(source).__name__}")
    if len(source) > MAX_SOURCE:
        raise BreakpointError(f"a condition is at most {MAX_SOURCE} characters")
    return check_tree(_Parser(source).parse())


def node_count(tree: Any) -> int:
    """How many parts a (checked) condition tree has: what testing it costs, per step it is tested."""
    if isinstance(tree, dict):
        return 1 + sum(node_count(v) for v in tree.values() if isinstance(v, (dict, list)))
    if isinstance(tree, list):
        return sum(node_count(v) for v in tree if isinstance(v, (dict, list)))
    return 0


def check_tree(tree: Any) -> dict[str, Any]:
    """Validate a tree from the wire: only the node shapes above, known terms, plain values."""
    count = [0]

    def walk(node: Any, depth: int) -> None:
        count[0] += 1
        if count[0] > MAX_NODES or depth > MAX_DEPTH:
            raise BreakpointError(f"a condition has at most {MAX_NODES} parts, nested at most {MAX_DEPTH} deep")
        if not isinstance(node, dict) or len(node) == 0:
            raise BreakpointError("a condition node must be an object")
        keys = set(node)
        if keys in ({"and"}, {"or"}):
            parts = next(iter(node.values()))
            if not isinstance(parts, list) or len(parts) < 2:
                raise BreakpointError("'and'/'or' take a list of two or more conditions")
            for p in parts:
                walk(p, depth + 1)
        elif keys == {"not"}:
            walk(node["not"], depth + 1)
        elif keys - {"sae", "feature"} in ({"term", "op", "value"}, {"term", "op", "values"}):
            term, op = node["term"], node["op"]
            if term not in TERMS:
                raise BreakpointError(f"unknown term {term!r} in a condition; known: {', '.join(TERMS)}"[:300])
            if (term == "feature") != ({"sae", "feature"} <= keys) or (term != "feature" and keys & {"sae", "feature"}):
                raise BreakpointError("a feature term has 'sae' and 'feature', and only it has them")
            if term == "feature" and not (type(node["sae"]) is str and SAE_ID.fullmatch(node["sae"])
                                          and type(node["feature"]) is int and 0 <= node["feature"] < 1 << 31):
                raise BreakpointError("a feature term's sae is an SAE id and its feature an integer >= 0")
            values = node.get("values", [node.get("value")])
            if ("values" in node) != (op == "in") or (op != "in" and op not in COMPARISONS):
                raise BreakpointError(f"a comparison's op is one of {list(COMPARISONS)} or 'in' (with values), got {op!r}"[:300])
            if not isinstance(values, list) or not values or len(values) > 64:
                raise BreakpointError("'in' takes a list of 1 to 64 values")
            for v in values:
                text = _is_text(v)
                if not (_finite(v) or (text and term == "token")):
                    raise BreakpointError(f"{term} compares with {'a token id or text' if term == 'token' else 'numbers'}, got {v!r}"[:300])
                if text and op not in TEXT_COMPARISONS:
                    raise BreakpointError(f"a token's text compares only with == != or in (texts have no order), not {op}")
        else:
            raise BreakpointError(f"not a condition node: keys {sorted(map(str, keys))}"[:300])

    walk(tree, 0)
    return tree


def _finite(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int past float's range (10**400)
        return False


def _is_text(v: Any) -> bool:
    """``{"text": str}`` as parsed, or ``{"text": str, "id": int}`` once resolved."""
    if not isinstance(v, dict) or not isinstance(v.get("text"), str) or len(v["text"]) > 200:
        return False
    if set(v) == {"text"}:
        return True
    return set(v) == {"text", "id"} and isinstance(v["id"], int) and not isinstance(v["id"], bool) and 0 <= v["id"] < 1 << 31


def has_texts(tree: Mapping[str, Any]) -> bool:
    """Whether any value of the tree is a token's text not yet resolved to its id."""
    found = []
    map_values(tree, lambda term, v: found.append(isinstance(v, dict) and "id" not in v))
    return any(found)


def resolve_texts(tree: Mapping[str, Any], token_ids: Callable[[str], list[int]]) -> dict[str, Any]:
    """The tree with each token text given its id: ``token_ids(text)`` must be one token.

    ``token_ids`` is the model's tokenizer without special tokens; a text of several
    tokens (or none) raises ``BreakpointError`` naming the text and its tokens.
    """
    def resolve(term: str, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        ids = list(token_ids(v["text"]))
        if len(ids) != 1:
            raise BreakpointError(
                f"token {v['text']!r} is {len(ids)} tokens {ids} for this model's tokenizer: a condition "
                f"compares one token; use one of their texts or ids"[:400]
            )
        return {"text": v["text"], "id": int(ids[0])}

    return map_values(tree, resolve)


def _operand(v: Any) -> Any:
    if isinstance(v, dict):
        if "id" not in v:
            raise BreakpointError(f"token text {v.get('text')!r} was not resolved to a token id")
        return v["id"]
    return v


def term_key(node: Mapping[str, Any]) -> str:
    """What a comparison reads: its term, or for a feature ``feature(sae,n)``."""
    return f"feature({node['sae']},{node['feature']})" if node["term"] == "feature" else node["term"]


def terms_of(tree: Mapping[str, Any]) -> set[str]:
    """The terms a tree reads (the server computes only those), features as ``feature(sae,n)``."""
    if "term" in tree:
        return {term_key(tree)}
    if "not" in tree:
        return terms_of(tree["not"])
    return set().union(*(terms_of(t) for t in next(iter(tree.values()))))


def feature_terms(tree: Mapping[str, Any]) -> set[tuple[str, int]]:
    """The (sae id, feature) pairs a tree reads."""
    if "term" in tree:
        return {(tree["sae"], tree["feature"])} if tree["term"] == "feature" else set()
    if "not" in tree:
        return feature_terms(tree["not"])
    return set().union(*(feature_terms(t) for t in next(iter(tree.values()))))


def map_values(tree: Mapping[str, Any], fn: Callable[[str, Any], Any]) -> dict[str, Any]:
    """A copy of the tree with each comparison value replaced by ``fn(term, value)``."""
    if "term" in tree:
        out = dict(tree)
        if "values" in tree:
            out["values"] = [fn(tree["term"], v) for v in tree["values"]]
        else:
            out["value"] = fn(tree["term"], tree["value"])
        return out
    if "not" in tree:
        return {"not": map_values(tree["not"], fn)}
    key = next(iter(tree))
    return {key: [map_values(t, fn) for t in tree[key]]}


def evaluate(tree: Mapping[str, Any], values: Mapping[str, float | int]) -> bool:
    """The tree's truth for the given term values (token texts already resolved to ids)."""
    if "and" in tree:
        return all(evaluate(t, values) for t in tree["and"])
    if "or" in tree:
        return any(evaluate(t, values) for t in tree["or"])
    if "not" in tree:
        return not evaluate(tree["not"], values)
    x = values[term_key(tree)]
    if tree["op"] == "in":
        return x in [_operand(v) for v in tree["values"]]
    return COMPARISONS[tree["op"]](x, _operand(tree["value"]))


def to_text(tree: Mapping[str, Any]) -> str:
    """The condition written back as text (for listings)."""
    def value(v: Any) -> str:
        return repr(v["text"]) if isinstance(v, dict) else repr(v)

    if "and" in tree or "or" in tree:
        key = "and" if "and" in tree else "or"
        return f" {key} ".join(f"({to_text(t)})" if ("and" in t or "or" in t) else to_text(t) for t in tree[key])
    if "not" in tree:
        inner = to_text(tree["not"])
        return f"not ({inner})"
    term = f"feature({tree['sae']}, {tree['feature']})" if tree["term"] == "feature" else tree["term"]
    if tree["op"] == "in":
        return f"{term} in [{', '.join(value(v) for v in tree['values'])}]"
    return f"{term} {tree['op']} {value(tree['value'])}"


__all__ = ["TERMS", "TEXT_COMPARISONS", "parse", "check_tree", "terms_of", "term_key", "feature_terms", "map_values", "has_texts",
           "resolve_texts", "evaluate", "to_text"]
