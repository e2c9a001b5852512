"""The experiment's YAML config (the study's schema plus device and timing) and its validation.

The study's own file must run as written, so the schema is the study's:
``model: {name: "gpt2", source: "transformers"}`` loads ``name`` with transformers
(a hub id or a directory; ``huggingface`` means the same). A ``source`` that is a
loader spec of its own (``embedded``, ``random:<shape>``, a hub id or directory)
is loaded instead, and ``name`` is then only a label; with no ``source`` the
model that ``name`` names is loaded. A config is strict: a key the schema does
not have is an error naming it and the nearest valid key, so a misspelling
(``num_trails``) cannot silently fall back to a default.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODIFICATIONS = ("scale", "add")
#: ``model.source`` values meaning "load ``model.name`` with transformers' ``from_pretrained``".
TRANSFORMERS_SOURCES = ("transformers", "huggingface")

#: Every key a config may have, by section (a nested dict is a section).
SCHEMA: dict[str, Any] = {
    "model": {"name": None, "source": None, "dtype": None, "device": None},
    "device": None,
    "device_map": None,
    "output_dir": None,
    "experiment": {
        "prompt": None,
        "prompt_tokens": None,
        "max_new_tokens": None,
        "num_trials": None,
        "seed": None,
        "breakpoints": {"layers": None, "fractions": None, "steps": None},
        "activation_steering": {
            "enabled": None, "steering_layer": None, "modification_type": None, "modification_factor": None,
        },
        "concurrent_demo": {"enabled": None},
    },
    "timing": {"warmup": None, "repeats": None, "generation_repeats": None},
}


class ConfigError(ValueError):
    """A config file that does not follow the schema (the message names the key)."""


@dataclass
class SteeringConfig:
    enabled: bool = True
    steering_layer: int | None = None  # None: the middle breakpoint layer
    modification_type: str = "scale"
    modification_factor: float = 0.9


@dataclass
class TimingConfig:
    warmup: int = 3
    repeats: int = 20  # per latency (median of these)
    generation_repeats: int = 5  # per whole-generation timing (armed vs plain)


@dataclass
class Exp3Config:
    model_name: str
    model_source: str  # what load_model loads: hub id, directory, embedded or random:<shape>
    dtype: str | None = None
    device: str = "cpu"
    device_map: str | None = None
    output_dir: str | None = None
    prompt: str = "The capital of France is"
    prompt_tokens: int | None = None  # set: a seeded random prompt of this many token ids
    max_new_tokens: int = 16
    num_trials: int = 3
    seed: int = 0
    layers: list[int] | None = None
    fractions: list[float] | None = None
    steps: str | list[int] = "all"
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    concurrent_demo: bool = True
    timing: TimingConfig = field(default_factory=TimingConfig)
    path: str | None = None

    def resolve_layers(self, num_layers: int) -> list[int]:
        """Breakpoint layers: explicit ``layers``, else ``int(f * num_layers)`` for each fraction."""
        if self.layers:
            layers = list(self.layers)
        else:
            layers = sorted({min(num_layers - 1, int(f * num_layers)) for f in (self.fractions or [0.25, 0.5, 0.75])})
        bad = [l for l in layers if not 0 <= l < num_layers]
        if bad:
            raise ConfigError(f"breakpoint layers {bad} are out of range for a model of {num_layers} layers")
        return layers

    def resolve_steering_layer(self, layers: list[int], num_layers: int) -> int:
        layer = self.steering.steering_layer
        if layer is None:
            layer = layers[len(layers) // 2]
        if not 0 <= layer < num_layers:
            raise ConfigError(f"steering_layer {layer} is out of range for a model of {num_layers} layers")
        return layer

    def breakpoint_steps(self) -> list[Any]:
        """The step part of each trial breakpoint: ``["all"]`` or a list of step numbers."""
        return ["all"] if self.steps == "all" else list(self.steps)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def check_keys(raw: dict[str, Any], schema: dict[str, Any] = SCHEMA, where: str = "") -> None:
    """Raise :class:`ConfigError` for the first key of ``raw`` (at any depth) not in ``schema``,
    naming it with its path and the nearest valid key."""
    for key, value in raw.items():
        path = f"{where}{key}"
        if key not in schema:
            near = difflib.get_close_matches(str(key), list(schema), n=1, cutoff=0.5)
            hint = f"did you mean '{where}{near[0]}'?" if near else f"valid keys here: {', '.join(schema)}"
            raise ConfigError(f"unknown config key '{path}': {hint}")
        if isinstance(schema[key], dict) and isinstance(value, dict):
            check_keys(value, schema[key], f"{path}.")


def resolve_source(name: str, source: str | None) -> str:
    """What ``load_model`` loads for ``model.name`` and ``model.source`` (see the module docstring)."""
    if source is None:
        return name
    if source.lower() in TRANSFORMERS_SOURCES:
        if name == "embedded" or name.startswith("random:"):
            raise ConfigError(
                f"model.source '{source}' loads model.name with transformers (a hub id or a directory), "
                f"not {name!r}; write source: {name!r} instead"
            )
        return name
    return source


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"'{key}' must be a mapping, got {type(value).__name__}")
    return value


def _typed(value: Any, kind: type | tuple[type, ...], key: str) -> Any:
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"'{key}' has the wrong type: {value!r}")
    return value


def parse_config(raw: dict[str, Any], path: str | None = None) -> Exp3Config:
    """Build an :class:`Exp3Config` from the parsed YAML, checking names and types."""
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a YAML mapping")
    check_keys(raw)
    model = _section(raw, "model")
    exp = _section(raw, "experiment")
    bps = _section(exp, "breakpoints")
    steer = _section(exp, "activation_steering")
    conc = _section(exp, "concurrent_demo")
    timing = _section(raw, "timing")
    if "name" not in model:
        raise ConfigError("'model.name' is required")
    steps = bps.get("steps", "all")
    if steps != "all" and not (isinstance(steps, list) and all(isinstance(s, int) for s in steps)):
        raise ConfigError("'experiment.breakpoints.steps' is 'all' or a list of step numbers")
    mod = steer.get("modification_type", "scale")
    if mod not in MODIFICATIONS:
        raise ConfigError(f"'activation_steering.modification_type' must be one of {MODIFICATIONS}, got {mod!r}")
    cfg = Exp3Config(
        model_name=str(model["name"]),
        model_source=resolve_source(str(model["name"]), _typed(model.get("source"), str, "model.source")),
        dtype=_typed(model.get("dtype"), str, "model.dtype"),
        device=str(raw.get("device", model.get("device", "cpu"))),
        device_map=_typed(raw.get("device_map"), str, "device_map"),
        output_dir=_typed(raw.get("output_dir"), str, "output_dir"),
        prompt=str(exp.get("prompt", "The capital of France is")),
        prompt_tokens=_typed(exp.get("prompt_tokens"), int, "experiment.prompt_tokens"),
        max_new_tokens=int(_typed(exp.get("max_new_tokens", 16), int, "experiment.max_new_tokens")),
        num_trials=int(_typed(exp.get("num_trials", 3), int, "experiment.num_trials")),
        seed=int(_typed(exp.get("seed", 0), int, "experiment.seed")),
        layers=_typed(bps.get("layers"), list, "experiment.breakpoints.layers"),
        fractions=_typed(bps.get("fractions"), list, "experiment.breakpoints.fractions"),
        steps=steps,
        steering=SteeringConfig(
            enabled=bool(steer.get("enabled", True)),
            steering_layer=_typed(steer.get("steering_layer"), int, "activation_steering.steering_layer"),
            modification_type=mod,
            modification_factor=float(_typed(steer.get("modification_factor", 0.9), (int, float), "activation_steering.modification_factor")),
        ),
        concurrent_demo=bool(conc.get("enabled", True)),
        timing=TimingConfig(
            warmup=int(_typed(timing.get("warmup", 3), int, "timing.warmup")),
            repeats=int(_typed(timing.get("repeats", 20), int, "timing.repeats")),
            generation_repeats=int(_typed(timing.get("generation_repeats", 5), int, "timing.generation_repeats")),
        ),
        path=path,
    )
    if cfg.max_new_tokens < 1 or cfg.num_trials < 1 or cfg.timing.repeats < 1 or cfg.timing.generation_repeats < 1:
        raise ConfigError("max_new_tokens, num_trials and the timing repeats must be at least 1")
    return cfg


def load_config(path: str | Path, **overrides: Any) -> Exp3Config:
    """Read a YAML config; ``overrides`` (model source, device, device_map, ...) win when not None."""
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    cfg = parse_config(raw, str(path))
    for key, value in overrides.items():
        if value is not None:
            if not hasattr(cfg, key):
                raise ConfigError(f"unknown override {key!r}")
            setattr(cfg, key, value)
    return cfg
