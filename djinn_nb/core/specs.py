"""What a client asks of a run, parsed and validated: breakpoints (layer, step, site), sampling, edits.

Everything here arrives from the wire (JSON) or from user code; each check
raises a ``BadRequestError`` subclass naming what was wrong, so the engine only
ever sees well-formed requests.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from ..conditions import check_tree as check_condition, has_texts, node_count, parse as parse_condition, resolve_texts
from ..errors import BadRequestError, BreakpointError, NoTokenizerError
from .sites import DEFAULT_SITE, ORDER, SITES, check_site

if TYPE_CHECKING:
    from .features import Clamp

ALL_STEPS = "all"


@dataclass(frozen=True, order=True)
class Point:
    """A place in one forward pass: a site of decoder block ``layer``; ordered as the forward runs."""

    layer: int
    order: int  # the site's position in the block (sites.ORDER)

    @staticmethod
    def at(layer: int, site: str) -> "Point":
        return _point(layer, site)

    @property
    def site(self) -> str:
        return SITES[self.order]


@dataclass(frozen=True)
class Breakpoint:
    """Stop at ``site`` of decoder block ``layer`` at generation step ``step`` (``None``: every step).

    ``when`` (a condition tree as canonical JSON, see :mod:`djinn_nb.conditions`): stop only
    at the steps whose output meets it.
    """

    layer: int
    step: int | None = 0
    site: str = DEFAULT_SITE
    when: str | None = None

    @functools.cached_property  # the step loop asks at every step; a frozen instance keeps it
    def point(self) -> Point:
        return Point.at(self.layer, self.site)

    @property
    def condition(self) -> dict[str, Any] | None:
        return None if self.when is None else _tree(self.when)

    def covers(self, step: int) -> bool:
        return self.step is None or self.step == step

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer, "step": ALL_STEPS if self.step is None else self.step, "site": self.site}
        if self.when is not None:
            out["when"] = self.condition
        return out


@functools.lru_cache(maxsize=4096)
def _point(layer: int, site: str) -> Point:
    return Point(layer, ORDER[site])


@functools.lru_cache(maxsize=256)
def _tree(when: str) -> dict[str, Any]:
    return json.loads(when)


def condition_json(tree: dict[str, Any]) -> str:
    """The canonical text of a condition tree (what ``Breakpoint.when`` holds)."""
    return json.dumps(tree, sort_keys=True, separators=(",", ":"))


def finite_number(x: Any) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _int(value: Any, what: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,9}\s*", value):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 1 << 31:
        raise BreakpointError(f"{what} must be an integer, got {value!r}"[:200])
    return value


def parse_breakpoint(spec: Any) -> Breakpoint:
    """``6`` → (6, 0, resid_post); ``(6, 3)``, ``(6, "all", "mlp_out")``,
    ``{"layer": 6, "step": "all", "site": "z"}`` and ``"6:all"`` / ``"6:3:attn_out"`` as written."""
    if isinstance(spec, Breakpoint):
        return spec
    if isinstance(spec, str) and ":" in spec:
        spec = tuple(spec.split(":", 2))
    when = None
    if isinstance(spec, dict):
        unknown = set(spec) - {"layer", "step", "site", "when"}
        if unknown or "layer" not in spec:
            raise BreakpointError(
                f"a breakpoint dict takes 'layer' and optional 'step', 'site' and 'when', got {sorted(map(str, spec))}"[:300]
            )
        if spec.get("when") is not None:
            w = spec["when"]
            when = condition_json(parse_condition(w) if isinstance(w, str) else check_condition(w))
        spec = (spec["layer"], spec.get("step", 0), spec.get("site", DEFAULT_SITE))
    if isinstance(spec, (tuple, list)):
        if len(spec) not in (2, 3):
            raise BreakpointError(f"a breakpoint is (layer, step) or (layer, step, site), got {spec!r}"[:300])
        layer, step, site = (*spec, DEFAULT_SITE) if len(spec) == 2 else spec
    else:
        layer, step, site = spec, 0, DEFAULT_SITE
    layer = _int(layer, "breakpoint layer")
    site = check_site(site.strip() if isinstance(site, str) else site)
    if step is None or (isinstance(step, str) and step.strip().lower() == ALL_STEPS):
        return Breakpoint(layer, None, site, when)
    return Breakpoint(layer, _int(step, "breakpoint step"), site, when)


def check_text(text: str) -> str:
    """A text the tokenizer can take: valid Unicode (JSON can carry a lone surrogate, which the
    tokenizer refused with an internal error)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequestError(f"the text is not valid Unicode: a lone surrogate {text[e.start]!r} at character "
                              f"{e.start}") from None
    return text


#: Breakpoints (and, separately, watches) one run may have: each is looked at every step.
MAX_BREAKPOINTS = 4096
#: Parts of all of one run's conditions together: 1,000 parts cost about a quarter of a tiny
#: GPT-2's step on a CPU (64 conditions of 60 parts each made it 1.9x slower), far less on a real model.
MAX_CONDITION_PARTS = 1000


def parse_breakpoints(
    specs: Iterable[Any] | None, num_layers: int, max_new_tokens: int,
    token_ids: Callable[[str], list[int]] | None = None,
) -> tuple[Breakpoint, ...]:
    """Parse and range-check breakpoints; duplicates collapse.

    ``token_ids`` (the model's tokenizer, text → ids) resolves a condition's token
    texts to their ids here, when the breakpoint is set; without it a text is an error.
    """
    if specs is None:
        return ()
    if isinstance(specs, (int, str, dict, Breakpoint)):
        specs = [specs]
    if not isinstance(specs, (list, tuple, set)):
        raise BreakpointError(f"breakpoints must be a list of layer, (layer, step) or dict, got {type(specs).__name__}")
    if len(specs) > MAX_BREAKPOINTS:
        raise BreakpointError(f"a run takes at most {MAX_BREAKPOINTS} breakpoints (and as many watches), got {len(specs)}")
    out = set()
    parts = 0
    for spec in specs:
        bp = parse_breakpoint(spec)
        cond = bp.condition
        if cond is not None:
            parts += node_count(cond)
            if parts > MAX_CONDITION_PARTS:
                raise BreakpointError(
                    f"a run's conditions have at most {MAX_CONDITION_PARTS} parts in all (each is tested at every "
                    "step it covers, on the shared device's time); use fewer or simpler conditions")
        if cond is not None and has_texts(cond):
            if token_ids is None:
                raise NoTokenizerError("this model has no tokenizer: compare token with token ids, not texts")
            bp = Breakpoint(bp.layer, bp.step, bp.site, condition_json(resolve_texts(cond, token_ids)))
        if not 0 <= bp.layer < num_layers:
            raise BreakpointError(
                f"breakpoint layer {bp.layer} is out of range: this model has layers 0..{num_layers - 1}"
            )
        if bp.step is not None and not 0 <= bp.step < max_new_tokens:
            raise BreakpointError(
                f"breakpoint step {bp.step} is out of range: max_new_tokens={max_new_tokens} "
                f"gives steps 0..{max_new_tokens - 1} (0 is the prompt pass)"
            )
        out.add(bp)
    return tuple(sorted(out, key=lambda b: (b.layer, ORDER[b.site], -1 if b.step is None else b.step, b.when or "")))


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is 0; otherwise seeded multinomial sampling."""

    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not finite_number(self.temperature) or self.temperature < 0:
            raise BadRequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}"[:200])
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k < 1 << 31:
            raise BadRequestError(f"top_k must be an integer >= 0, got {self.top_k!r}"[:200])
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 1 << 63:
            raise BadRequestError(f"seed must be an integer in 0..2**63-1, got {self.seed!r}"[:200])


@dataclass
class Edit:
    """A change to a paused activation: replace (or patch), then scale, then add.

    It applies to the pending activation (the site's value with earlier ``edit``
    calls applied), or with ``original`` to the site's own value. ``heads`` (at
    ``z`` only) restricts ``scale`` and ``add`` to those attention heads.
    ``patch_from`` names another run paused at the same layer, step and site: its
    activation replaces this one at ``positions`` (all positions if ``None``). ``clamp`` (after
    the replacement, before scale and add) sets an SAE's features, at ``positions`` too.
    """

    activation: torch.Tensor | None = None
    scale: float | None = None
    add: torch.Tensor | None = None
    original: bool = False
    heads: tuple[int, ...] | None = None
    patch_from: str | None = None
    positions: tuple[int, ...] | None = None
    clamp: Clamp | None = None

    @property
    def empty(self) -> bool:
        return (self.activation is None and self.scale is None and self.add is None
                and not self.original and self.heads is None and self.patch_from is None
                and self.positions is None and self.clamp is None)
