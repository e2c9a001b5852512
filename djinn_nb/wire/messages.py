"""What crosses the wire about runs, typed: run briefs, run summaries, listing rows, history, lens,
server info, watch hits, and the requests that start, edit, fork and compare runs.

Server and client share these dataclasses (serving builds them from a core run in
:mod:`djinn_nb.serving.run_views`; core never imports them). Each has one ``from_json`` that
validates a decoded JSON object (unknown or missing keys, wrong types, as its
fields' annotations say: see :mod:`djinn_nb.wire.typed`) and raises
``BadRequestError`` naming the field, so neither side reads a run through
string keys. No torch, no rpyc. A run's state is :class:`djinn_nb.states.RunState`, shared
with core.
Tensors are not part of a request's JSON; they travel beside it as a header
plus bytes, or as a side-channel ticket (``TensorRef``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..states import RunState
from .typed import Message, fail


#: A tensor beside a request: an inline header (``{"dtype", "shape"}``, bytes sent separately)
#: or an uploaded one (``{"ticket"}``); validated where the bytes are decoded.
TensorRef = dict


@dataclass
class RunRow(Message):
    """One line of ``client.runs()``: where a run is and what it holds, without its tokens."""

    id: str
    state: RunState
    layer: int | None
    site: str | None
    step: int
    tokens: int
    bytes_held: int
    offloaded: bool
    parent: str | None
    idle_s: float

    def __post_init__(self) -> None:
        self.state = _state(type(self), self.state)

    @staticmethod
    def checked(obj: Any) -> dict[str, Any]:
        """``obj`` itself if it is a valid row (the listing's fast path: no dataclass in between),
        else the ``BadRequestError`` that ``from_json`` raises for it."""
        if (type(obj) is dict and obj.keys() == _ROW_KEYS and type(obj["id"]) is str and obj["state"] in _STATES
                and type(obj["step"]) is int and type(obj["tokens"]) is int and type(obj["bytes_held"]) is int
                and type(obj["offloaded"]) is bool and type(obj["idle_s"]) in (int, float)
                and (obj["layer"] is None or type(obj["layer"]) is int)
                and (obj["site"] is None or type(obj["site"]) is str)
                and (obj["parent"] is None or type(obj["parent"]) is str) and math.isfinite(obj["idle_s"])):
            return obj
        return RunRow.from_json(obj).to_json()


@dataclass
class RunSummary(Message):
    """A run as a client sees it after each call: tokens, where it paused, what it holds.

    ``activation`` (at a pause) has the paused tensor's shape, dtype, ``edited`` and
    its statistics (norm/mean/std/max/min, and per position).
    """

    id: str
    state: RunState
    step: int
    layer: int | None
    site: str | None
    token_ids: list[int]
    prompt_ids: list[int]
    max_new_tokens: int
    breakpoints: list[dict[str, Any]] = field(default_factory=list)
    watches: list[dict[str, Any]] = field(default_factory=list)
    watched: int = 0
    bytes_held: int = 0
    offloaded: bool = False
    parent: str | None = None
    error: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    continued_by: str | None = None
    topk: list[list[float]] | None = None
    activation: dict[str, Any] | None = None
    idle_s: float = 0.0
    v: int = -1  # the run's version when this was read (see RunBrief)
    #: at a conditional pause: ``{"step", "conditions": [{"layer", "site", "when", "values"}]}``
    held: dict[str, Any] | None = None
    #: the text of ``token_ids`` (what the run card shows), with a tokenizer
    text: str | None = None

    def __post_init__(self) -> None:
        self.state = _state(type(self), self.state)
        for name in ("token_ids", "prompt_ids"):
            if any(type(t) is not int for t in getattr(self, name)):
                raise fail(type(self), f"{name} must be a list of ints")

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass
class HistoryRecord(Message):
    """One generated token of ``run.history()``: its step, id, the top-k ``(id, prob)`` when it was
    picked, the entropy (nats), ``time_s`` (after the run's first timed token; None for tokens a fork
    or rewind took over), and with a tokenizer the texts ``token`` and ``topk_tokens``."""

    step: int
    token_id: int
    topk: list[Any]
    entropy: float | None
    time_s: float | None = None
    token: str | None = None
    topk_tokens: list[str] | None = None

    def __post_init__(self) -> None:
        if not all(isinstance(e, (list, tuple)) and len(e) == 2 and type(e[0]) is int and type(e[1]) in (int, float)
                   for e in self.topk):
            raise fail(type(self), "topk must be a list of [token id, probability] pairs")
        if self.topk_tokens is not None and not all(type(t) is str for t in self.topk_tokens):
            raise fail(type(self), "topk_tokens must be a list of strings")

    def record(self) -> dict[str, Any]:
        """The dict ``run.history()`` gives: top-k as tuples, texts only where the server sent them."""
        rec: dict[str, Any] = {"step": self.step, "token_id": self.token_id}
        if self.token is not None:
            rec["token"] = self.token
        rec["topk"] = [(int(t), float(p)) for t, p in self.topk]
        rec["entropy"] = math.nan if self.entropy is None else float(self.entropy)
        rec["time_s"] = None if self.time_s is None else float(self.time_s)
        if self.topk_tokens is not None:
            rec["topk_tokens"] = list(self.topk_tokens)
        return rec


def history_records(obj: Any) -> list[dict[str, Any]]:
    """A ``history`` reply checked record by record (a ``BadRequestError`` naming the field)."""
    if type(obj) is not list:
        raise fail(HistoryRecord, f"expected a list of records, got {type(obj).__name__}")
    return [HistoryRecord.from_json(r).record() for r in obj]


@dataclass
class LensReply(Message):
    """``run.lens(k)``: per position the top-``k`` token ids and probabilities, and the texts of the
    tokens it names (``text_ids`` → ``texts``, with a tokenizer)."""

    ids: list[list[int]]
    probs: list[list[float]]
    text_ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        rows_ok = len(self.ids) == len(self.probs) and all(
            type(i) is list and type(p) is list and len(i) == len(p) and all(type(t) is int for t in i)
            and all(type(x) in (int, float) for x in p) for i, p in zip(self.ids, self.probs))
        if not rows_ok:
            raise fail(type(self), "ids and probs must be equal-shaped lists of rows (ints, numbers)")
        if len(self.text_ids) != len(self.texts) or not all(type(t) is int for t in self.text_ids) or not all(
                type(t) is str for t in self.texts):
            raise fail(type(self), "text_ids and texts must be equal-length lists of ints and strings")


@dataclass
class ServerInfo(Message):
    """``info`` (``client.info``): the model served (its name, architecture, sizes, the sites a breakpoint
    may name, the positions it takes, the generation settings ignored), where and how (device, dtype,
    tokenizer, CPU threads)."""

    model: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    device: str
    dtype: str
    has_tokenizer: bool
    block_path: str
    sites: list[str]
    parameters: int
    max_positions: int | None
    generation_config_ignored: list[str]
    threads: int
    omp_wait_policy: str

    def __post_init__(self) -> None:
        if not all(type(t) is str for t in self.sites + self.generation_config_ignored):
            raise fail(type(self), "sites and generation_config_ignored must be lists of strings")


@dataclass
class HelloReply(ServerInfo):
    """``hello``'s answer: the server's djinn_nb version and protocol, and its ``ServerInfo``."""

    server_version: str
    protocol: int

    def to_json(self) -> dict[str, Any]:
        return {"server_version": self.server_version, "protocol": self.protocol, **ServerInfo.to_json(self)}


@dataclass
class WatchHit(Message):
    """One hit of ``run.watched()``: its index, place (layer, site, step), the value's shape and its
    statistics (norm/mean/std/max/min overall, norm/mean/max per position; null where not finite)."""

    index: int
    layer: int
    site: str
    step: int
    shape: list[int]
    norm: float | None
    mean: float | None
    std: float | None
    max: float | None
    min: float | None
    position_norm: list[float | None]
    position_mean: list[float | None]
    position_max: list[float | None]

    def __post_init__(self) -> None:
        stats = self.position_norm + self.position_mean + self.position_max
        if any(type(n) is not int for n in self.shape) or any(x is not None and type(x) not in (int, float) for x in stats):
            raise fail(type(self), "shape must be a list of ints, the per-position statistics lists of numbers")


@dataclass(slots=True)  # slots: built on every step's and fork's path, on both ends
class RunBrief:
    """What a step, fork or refresh answers: where the run is, and the token ids the client lacks.

    The client sent ``since``, how many token ids it holds of the run (or of a new run's source);
    the run's ids are those ``[:keep]`` followed by ``tokens``. ``v`` is the run's version: while
    it matches a :class:`RunSummary`'s ``v``, that summary's details (statistics, top-k, bytes
    held, timings) are current, and the client need not ask for them again.

    ``text`` is the text of the run's token ids where the caller reads it next: a new run's (fork,
    rewind) and a run no longer paused, with a tokenizer (None at a step's pause, which stays
    small). ``history`` comes only for a fork closed at once (``ForkRequest.close``): its
    ``run.history()`` records, texts included. ``probs``: the probabilities of a fork's
    ``ForkRequest.probs_of`` tokens at its last finished step, in that order (a sweep's numbers).
    """

    id: str
    state: RunState
    step: int
    layer: int | None
    site: str | None
    keep: int
    tokens: list[int]
    max_new_tokens: int
    parent: str | None
    offloaded: bool
    error: str | None
    v: int
    timings_ms: dict[str, float]  # the server's parts of the call that answered (read even once closed)
    text: str | None = None
    history: list[dict[str, Any]] | None = None
    probs: list[float] | None = None

    _FIELDS = ("id", "state", "step", "layer", "site", "keep", "tokens", "max_new_tokens", "parent", "offloaded",
               "error", "v", "timings_ms", "text", "history", "probs")

    def to_json(self) -> dict[str, Any]:
        """The brief as the wire carries it, by hand (no field walk: fork_many builds dozens per call;
        ``_value_``: the state's str without ``value``'s property); ``probs`` only where a fork asked for
        them (``text`` and ``history`` always, null if none)."""
        obj: dict[str, Any] = {
            "id": self.id, "state": self.state._value_, "step": self.step, "layer": self.layer, "site": self.site,
            "keep": self.keep, "tokens": self.tokens, "max_new_tokens": self.max_new_tokens, "parent": self.parent,
            "offloaded": self.offloaded, "error": self.error, "v": self.v, "timings_ms": self.timings_ms,
            "text": self.text, "history": self.history}
        if self.probs is not None:
            obj["probs"] = self.probs
        return obj

    @classmethod
    def from_json(cls, obj: Any) -> "RunBrief":
        """Checked field by field, by hand: this parse is on every step's path."""
        if type(obj) is not dict or not _BRIEF_REQUIRED <= obj.keys() <= _BRIEF_KEYS:
            raise fail(cls, f"expected an object with fields {list(cls._FIELDS)} (text and history optional)")
        step, keep, limit, v = obj["step"], obj["keep"], obj["max_new_tokens"], obj["v"]
        if not (type(step) is int and type(keep) is int and type(limit) is int and type(v) is int and keep >= 0):
            raise fail(cls, "step, keep, max_new_tokens and v must be integers (keep >= 0)")
        run_id, offloaded, tokens, state = obj["id"], obj["offloaded"], obj["tokens"], obj["state"]
        if type(run_id) is not str or type(offloaded) is not bool:
            raise fail(cls, "id must be a string and offloaded a boolean")
        layer, site, parent, error = obj["layer"], obj["site"], obj["parent"], obj["error"]
        for name, value, kind in (("layer", layer, int), ("site", site, str), ("parent", parent, str),
                                  ("error", error, str)):
            if value is not None and type(value) is not kind:
                raise fail(cls, f"{name} must be {kind.__name__} or null")
        if type(tokens) is not list or (tokens and not all(type(t) is int for t in tokens)):
            raise fail(cls, "tokens must be a list of ints")
        timings = obj["timings_ms"]
        if type(timings) is not dict or len(timings) > 16 or not all(
                type(k) is str and type(t) in (int, float) for k, t in timings.items()):
            raise fail(cls, "timings_ms must be an object of at most 16 numbers")
        text, history = obj.get("text"), obj.get("history")
        if (text is not None and type(text) is not str) or (history is not None and (
                type(history) is not list or not all(type(r) is dict for r in history))):
            raise fail(cls, "text must be a string or null, history a list of objects or null")
        probs = obj.get("probs")
        if probs is not None and (type(probs) is not list or not all(type(p) is float for p in probs)):
            raise fail(cls, "probs must be a list of floats or null")
        return cls(run_id, _STATES.get(state) or _state(cls, state), step, layer, site, keep, tokens, limit, parent,
                   offloaded, error, v, timings, text, history, probs)


_BRIEF_KEYS = frozenset(RunBrief._FIELDS)
_BRIEF_REQUIRED = _BRIEF_KEYS - {"text", "history", "probs"}
_ROW_KEYS = frozenset(f.name for f in dataclasses.fields(RunRow))
_STATES = {s.value: s for s in RunState}


def _state(cls: type, value: Any) -> RunState:
    try:
        return RunState(value)
    except ValueError:
        raise fail(cls, f"state must be one of {[s.value for s in RunState]}, got {value!r}") from None


@dataclass
class GenerateRequest(Message):
    """Start a run: the prompt (text or token ids), its length, breakpoints, watches, sampling."""

    prompt: str | list[int]
    max_new_tokens: int = 16
    breakpoints: list[Any] | None = None
    watches: list[Any] | None = None
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    record_logits: bool = False



@dataclass
class EditRequest(Message):
    """A change to a paused activation: replace (or patch), then scale, then add (``heads``: only
    those, at ``z``).

    ``original`` starts from the site's own value instead of the pending (edited) one.
    ``patch_from`` (a run id, paused at the same layer, step and site) writes that run's
    activation at ``positions`` (all if ``None``). ``clamp``: ``{"sae": id, "features":
    [[feature, value], ...]}`` sets those features of a loaded SAE (at ``positions`` too).
    """

    scale: float | None = None
    activation: TensorRef | None = None
    add: TensorRef | None = None
    original: bool = False
    heads: list[int] | None = None
    patch_from: str | None = None
    positions: list[int] | None = None
    clamp: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("heads", "positions"):
            values = getattr(self, name)
            if values is not None and any(type(h) is not int for h in values):
                raise fail(type(self), f"{name} must be a list of ints")
        if self.clamp is not None and (set(self.clamp) != {"sae", "features"} or type(self.clamp["sae"]) is not str
                                       or type(self.clamp["features"]) is not list):
            raise fail(type(self), "clamp must be {'sae': an SAE id, 'features': [[feature, value], ...]}")

    @property
    def empty(self) -> bool:
        return self == EditRequest()


@dataclass
class ForkRequest(Message):
    """A fork: an edit, and the new run's breakpoints (``None``: the parent's) and length;
    ``close``: closed on the server as soon as it stops, its reply carrying all a caller can read
    of it (tokens, text, history), for a look at a continuation that keeps nothing."""

    edit: EditRequest = field(default_factory=EditRequest)
    breakpoints: list[Any] | None = None
    max_new_tokens: int | None = None
    close: bool = False
    probs_of: list[int] | None = None  # token ids whose probability at its last step rides in its reply


    @classmethod
    def from_json(cls, obj: Any) -> "ForkRequest":
        if isinstance(obj, dict) and isinstance(obj.get("edit", {}), dict):
            obj = {**obj, "edit": EditRequest.from_json(obj.get("edit", {}))}
        elif isinstance(obj, dict):
            raise fail(cls, "edit must be an object")
        return super().from_json(obj)

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "edit": self.edit.to_json()}


@dataclass
class DiffRequest(Message):
    """``diff``: runs ``a`` and ``b`` (one prompt), the layers (default all) and site compared, the
    top-k at the divergence, and ``steps`` ``[start, stop)`` (default every step both finished)."""

    a: str
    b: str
    layers: list[int] | None = None
    site: str = "resid_post"
    k: int = 5
    steps: list[int] | None = None



@dataclass
class DiffReply(Message):
    """Two branches compared (see ``djinn_nb.core.branches``). ``distance``/``norm`` are
    ``[layer index][step index]`` (``norm``: of run a's state); ``kl[i]`` is KL(a ‖ b) at
    ``steps[i]``; None where a value is not known (an unreproduced step: ``unreproduced_a/_b``).
    ``source[i]``: ``watched`` or ``recomputed``. At the ``divergence`` (the first step whose
    tokens differ, or None), each run's top-k ``[id, prob]`` and, at a residual site, its logit
    lens per layer. ``text_ids``/``texts``: the texts of the tokens named, with a tokenizer."""

    a: str
    b: str
    prompt_len: int
    tokens_a: list[int]
    tokens_b: list[int]
    layers: list[int]
    steps: list[int]
    site: str
    divergence: int | None
    distance: list[list[float | None]]
    norm: list[list[float | None]]
    kl: list[float | None]
    source: list[str]
    unreproduced_a: list[int] = field(default_factory=list)
    unreproduced_b: list[int] = field(default_factory=list)
    topk_a: list[list[float]] | None = None
    topk_b: list[list[float]] | None = None
    lens_a: list[list[list[float]]] | None = None
    lens_b: list[list[list[float]]] | None = None
    text_ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        cls, rows, cols = type(self), len(self.layers), len(self.steps)
        for name in ("tokens_a", "tokens_b", "layers", "steps", "unreproduced_a", "unreproduced_b", "text_ids"):
            if any(type(t) is not int for t in getattr(self, name)):
                raise fail(cls, f"{name} must be a list of ints")
        for name in ("distance", "norm"):
            grid = getattr(self, name)
            if len(grid) != rows or any(type(row) is not list or len(row) != cols for row in grid):
                raise fail(cls, f"{name} must be {rows} rows of {cols} values")
        if len(self.kl) != cols or len(self.source) != cols or len(self.texts) != len(self.text_ids):
            raise fail(cls, "kl and source have a value per step, texts one per text id")
