"""Sparse autoencoders on the server: read SAELens's files, encode and decode, one registry per engine.

Why here, on the server: an SAE reads the activation where the run paused, and its
weights are as large as a layer of the model (``d_in × d_sae`` twice); moving the
activation to the notebook at every step would cost a round trip and its bytes, moving
the weights there would cost the notebook's memory. So an SAE is loaded next to the model
(its device, its dtype), counted to the user who loaded it like a run's bytes, and read
there: ``features`` at a pause, ``feature(id, n)`` in a condition, a clamp in an edit.

The files are SAELens's (``cfg.json`` + ``sae_weights.safetensors``, as ``SAE.save_model``
writes them), read here without SAELens: JSON and safetensors only, never a pickle.
``encode``/``decode`` compute what SAELens's ``StandardSAE``, ``JumpReLUSAE`` and
``TopKSAE`` compute, op for op (tests compare with SAELens where it is installed):

- standard: ``f = relu((x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc)``
- jumprelu: the same ``relu``, times ``(pre > threshold)``
- topk: the ``k`` largest pre-activations (scaled by ``‖W_dec‖`` rows with
  ``rescale_acts_by_decoder_norm``), ``relu``'d, the rest 0
- ``decode(f) = f @ W_dec + b_dec``; at site ``z`` (``reshape_activations: hook_z``) the
  heads are flattened in and unflattened out.

A file's contents never appear in an error message (a path must not become a way to read
the server's files): errors name the file and the field, not what it holds.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SaeError
from .sites import SITES

__all__ = ["SAE", "SaeFiles", "SaeRegistry", "ARCHITECTURES", "parse_hook", "inspect_dir", "load_tensors"]

ARCHITECTURES = ("standard", "jumprelu", "topk")
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
MAX_CFG_BYTES = 1 << 20
MAX_D_SAE = 1 << 24
SAE_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")
#: TransformerLens hook names (after ``blocks.N.``) of the sites a breakpoint can pause at
HOOKS = {"hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
         "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out", "attn.hook_z": "z"}
_HOOK = re.compile(r"blocks\.(\d{1,6})\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out|"
                   r"attn\.hook_z)")


def parse_hook(site: Any, num_layers: int) -> tuple[int, str]:
    """``(8, "resid_pre")`` or ``"blocks.8.hook_resid_pre"`` -> ``(8, "resid_pre")``, range-checked."""
    if isinstance(site, str):
        m = _HOOK.fullmatch(site.strip())
        if m is None:
            raise SaeError(f"site {site!r} is not a hook djinn can read: blocks.N.hook_resid_pre, hook_resid_mid, "
                           "hook_resid_post, hook_attn_out, hook_mlp_out or attn.hook_z, or (layer, site)"[:300])
        layer, name = int(m.group(1)), HOOKS[m.group(2)]
    elif isinstance(site, (list, tuple)) and len(site) == 2:
        layer, name = site
        if isinstance(layer, bool) or not isinstance(layer, int) or name not in SITES:
            raise SaeError(f"site must be (layer, one of {', '.join(SITES)}), got {site!r}"[:300])
    else:
        raise SaeError(f"site must be (layer, site) or a hook name like 'blocks.8.hook_resid_pre', got {site!r}"[:300])
    if not 0 <= layer < num_layers:
        raise SaeError(f"SAE site layer {layer} is out of range: this model has layers 0..{num_layers - 1}")
    return layer, name


@dataclass(frozen=True)
class SaeFiles:
    """What the files say, read before any tensor is: the config and each tensor's shape."""

    path: str
    architecture: str
    d_in: int
    d_sae: int
    hook: str | None  # the cfg's hook name, if it names one
    apply_b_dec_to_input: bool
    k: int | None
    rescale: bool  # topk's rescale_acts_by_decoder_norm
    reshape_z: bool
    shapes: dict[str, tuple[int, ...]]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())


def _cfg_field(cfg: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any = ...) -> Any:
    value = cfg.get(name, default)
    if value is ...:
        raise SaeError(f"{CFG_FILE} has no {name!r}")
    if type(value) not in kinds and value is not default:
        raise SaeError(f"{CFG_FILE}: {name!r} must be {' or '.join(k.__name__ for k in kinds)}")
    return value


def inspect_dir(path: Any, roots: tuple[str, ...] | None = None) -> SaeFiles:
    """Check a directory on this machine holds an SAE in SAELens's format; nothing is loaded yet.

    Every way of not being one (no such path, not a directory, unreadable, a file missing)
    is the same error, naming only the path given. With ``roots``, a path (links resolved)
    outside them is refused before anything about it is looked at.
    """
    if type(path) is not str or not path or len(path) > 4096 or "\0" in path:
        raise SaeError("an SAE path is a non-empty text of at most 4096 characters")
    if roots == ():
        raise SaeError("this shared server loads SAEs only from directories its admin names "
                       "(djinn-server --sae-dir DIR); it was started with none")
    where = os.path.realpath(os.path.expanduser(path))
    if roots is not None and not any(os.path.commonpath([where, os.path.realpath(r)]) == os.path.realpath(r)
                                     for r in roots):
        raise SaeError("this server loads SAEs only from its SAE directories (djinn-server --sae-dir); "
                       f"{path!r} is not under one"[:300])
    cfg_path, weights = os.path.join(where, CFG_FILE), os.path.join(where, WEIGHTS_FILE)
    if os.path.islink(cfg_path) or os.path.islink(weights):  # a link could lead out of the SAE directories
        raise SaeError(f"{path!r}: {CFG_FILE} and {WEIGHTS_FILE} must be files, not links"[:300])
    if not (os.path.isdir(where) and os.path.isfile(cfg_path) and os.path.isfile(weights)
            and os.access(cfg_path, os.R_OK) and os.access(weights, os.R_OK)):
        raise SaeError(f"{path!r} is not a readable directory holding {CFG_FILE} and {WEIGHTS_FILE} "
                       "(SAELens's format) on the server"[:400])
    if os.path.getsize(cfg_path) > MAX_CFG_BYTES:
        raise SaeError(f"{CFG_FILE} is larger than {MAX_CFG_BYTES} bytes: not an SAE config")
    try:
        with open(cfg_path, "rb") as f:
            cfg = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise SaeError(f"{CFG_FILE} in {path!r} is not UTF-8 JSON"[:300]) from None
    shapes = _header(weights, path)
    return files_from(cfg, shapes, where)


def files_from(cfg: Any, shapes: dict[str, tuple[int, ...]], where: str) -> SaeFiles:
    """An SAE's description from its config and its tensors' shapes (from files or an upload)."""
    if not isinstance(cfg, dict):
        raise SaeError(f"{CFG_FILE} must hold a JSON object")
    meta: dict[str, Any] = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else {}
    arch = _cfg_field(cfg, "architecture", (str,), "standard")
    if arch not in ARCHITECTURES:
        raise SaeError(f"{CFG_FILE}: architecture must be one of {', '.join(ARCHITECTURES)} here")
    d_in, d_sae = _cfg_field(cfg, "d_in", (int,)), _cfg_field(cfg, "d_sae", (int,))
    if not (0 < d_in <= 1 << 20 and 0 < d_sae <= MAX_D_SAE):
        raise SaeError(f"{CFG_FILE}: d_in must be in 1..{1 << 20} and d_sae in 1..{MAX_D_SAE}")
    norm = _cfg_field(cfg, "normalize_activations", (str,), "none")
    if norm != "none":
        raise SaeError(f"{CFG_FILE}: normalize_activations other than 'none' is not supported here")
    if cfg.get("finetuning_scaling_factor") not in (None, False) or "scaling_factor" in shapes:
        raise SaeError("a finetuning scaling factor is not supported here")
    hook = meta.get("hook_name", cfg.get("hook_name"))
    hook = hook if type(hook) is str and len(hook) <= 200 else None
    reshape = _cfg_field(cfg, "reshape_activations", (str,), "hook_z" if hook and "hook_z" in hook else "none")
    if reshape not in ("none", "hook_z"):
        raise SaeError(f"{CFG_FILE}: reshape_activations must be 'none' or 'hook_z'")
    k = None
    if arch == "topk":
        k = _cfg_field(cfg, "k", (int,))
        if not 0 < k <= d_sae:
            raise SaeError(f"{CFG_FILE}: k must be in 1..d_sae")
    want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if arch == "jumprelu":
        want["log_threshold" if "log_threshold" in shapes else "threshold"] = (d_sae,)
    for name, shape in want.items():
        if shapes.get(name) != shape:
            raise SaeError(f"{WEIGHTS_FILE}: {name} must have shape {shape} for d_in={d_in}, d_sae={d_sae} "
                           f"({'missing' if name not in shapes else 'it has ' + str(shapes[name])})")
    return SaeFiles(where, arch, d_in, d_sae, hook, bool(_cfg_field(cfg, "apply_b_dec_to_input", (bool,), True)), k,
                    bool(_cfg_field(cfg, "rescale_acts_by_decoder_norm", (bool,), False)), reshape == "hook_z",
                    {n: shapes[n] for n in want})


_FLOATS = ("F64", "F32", "F16", "BF16")


def _header(weights: str, path: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            out = {}
            for name in f.keys():
                s = f.get_slice(name)
                if s.get_dtype() not in _FLOATS:
                    raise SaeError(f"{WEIGHTS_FILE}: tensor {name[:64]!r} is not floating point")
                out[name] = tuple(int(n) for n in s.get_shape())
            return out
    except SaeError:
        raise
    except Exception:  # noqa: BLE001 - whatever the parser says would quote the file
        raise SaeError(f"{WEIGHTS_FILE} in {path!r} is not a readable safetensors file"[:300]) from None


def load_tensors(files: SaeFiles) -> dict[str, torch.Tensor]:
    """The tensors the description names, read from its directory (on the CPU, as stored)."""
    from safetensors import safe_open

    try:
        with safe_open(os.path.join(files.path, WEIGHTS_FILE), framework="pt", device="cpu") as f:
            out = {}
            for name, shape in files.shapes.items():
                # the file is opened again: each tensor is checked before it is read, so a file swapped
                # since the header was admitted cannot bring tensors of other sizes in
                part = f.get_slice(name)
                if tuple(int(n) for n in part.get_shape()) != tuple(shape) or part.get_dtype() not in _FLOATS:
                    raise SaeError(f"{WEIGHTS_FILE} changed while it was loaded; nothing was loaded")
                out[name] = f.get_tensor(name)
            return out
    except SaeError:
        raise
    except Exception:  # noqa: BLE001 - as in _header
        raise SaeError(f"{WEIGHTS_FILE} could not be read") from None


@dataclass(eq=False)
class SAE:
    """One loaded sparse autoencoder: its weights on the model's device and dtype, and its site."""

    id: str
    owner: str
    layer: int
    site: str
    files: SaeFiles
    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor | None = None
    labels: dict[int, str] = field(default_factory=dict)

    @classmethod
    def build(cls, sae_id: str, owner: str, layer: int, site: str, files: SaeFiles, tensors: dict[str, torch.Tensor],
              device: torch.device, dtype: torch.dtype) -> "SAE":
        """From tensors as read (any float dtype), converted to the model's device and dtype."""
        def put(name: str) -> torch.Tensor:
            return tensors[name].to(device=device, dtype=dtype).contiguous()

        threshold = None
        if "log_threshold" in tensors:  # older JumpReLU files (SAELens converts them the same way)
            threshold = torch.exp(tensors["log_threshold"].to(dtype)).to(device).contiguous()
        elif "threshold" in tensors:
            threshold = put("threshold")
        return cls(sae_id, owner, layer, site, files, put("W_enc"), put("W_dec"), put("b_enc"), put("b_dec"), threshold)

    @property
    def d_in(self) -> int:
        return self.files.d_in

    @property
    def d_sae(self) -> int:
        return self.files.d_sae

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def work_bytes(self, positions: int) -> int:
        """What encoding ``positions`` activations allocates on the way (the pre-activations, the
        features, a clamp's copy and two decodes: about four positions × d_sae tensors), to admit
        before it happens."""
        return 4 * max(1, int(positions)) * self.d_sae * self.W_enc.element_size()

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.W_enc, self.W_dec, self.b_enc, self.b_dec, self.threshold) if t is not None]

    def describe(self) -> dict[str, Any]:
        """What a listing shows (no tensor, no path)."""
        return {"id": self.id, "layer": self.layer, "site": self.site, "d_in": self.d_in, "d_sae": self.d_sae,
                "architecture": self.files.architecture, "k": self.files.k, "bytes": self.nbytes,
                "hook": f"blocks.{self.layer}.{next(h for h, s in HOOKS.items() if s == self.site)}"}

    # ----- the arithmetic (SAELens's, op for op) ------------------------------------
    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """The activation as the SAE reads it: ``(..., d_in)`` in the SAE's dtype, ``b_dec`` taken off."""
        x = x.to(self.W_enc.dtype)
        if self.files.reshape_z:
            x = x.flatten(-2)
        if x.shape[-1] != self.d_in:
            raise SaeError(f"SAE {self.id} reads vectors of {self.d_in}, the activation has {x.shape[-1]}")
        return x - self.b_dec if self.files.apply_b_dec_to_input else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``(..., d_sae)`` of an activation ``(..., d_in)`` (at z: ``(..., heads, head_dim)``)."""
        pre = self._input(x) @ self.W_enc + self.b_enc
        arch = self.files.architecture
        if arch == "standard":
            return torch.relu(pre)
        if arch == "jumprelu":
            assert self.threshold is not None, "a jumprelu SAE is built with its threshold"
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        if self.files.rescale:
            pre = pre * self.W_dec.norm(dim=-1)
        assert self.files.k is not None, "a topk SAE is described with its k"
        values, idx = torch.topk(pre, k=self.files.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, values.relu())

    def decode(self, f: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction of feature activations; at z shaped as ``like`` (the activation)."""
        if self.files.architecture == "topk" and self.files.rescale:
            f = f * (1 / self.W_dec.norm(dim=-1))
        out = f @ self.W_dec + self.b_dec
        if self.files.reshape_z and like is not None:
            out = out.unflatten(-1, like.shape[-2:])
        return out


class SaeRegistry:
    """The loaded SAEs, by (owner, id): each user names and sees only their own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._saes: dict[tuple[str, str], SAE] = {}
        self._made: dict[str, int] = {}

    def new_id(self, owner: str, wanted: Any = None) -> str:
        """``wanted`` if free (and a name conditions can write), else the next ``saeN``."""
        with self._lock:
            if wanted is not None:
                if type(wanted) is not str or not SAE_ID.fullmatch(wanted):
                    raise SaeError("an SAE id is a letter or _ then up to 31 letters, digits or _ "
                                   f"(it is written in conditions: feature(id, n)), got {wanted!r}"[:300])
                if (owner, wanted) in self._saes:
                    raise SaeError(f"you already have an SAE {wanted!r}: unload it first or pick another id")
                return wanted
            n = self._made.get(owner, 0)
            while (owner, f"sae{n + 1}") in self._saes:
                n += 1
            self._made[owner] = n + 1
            return f"sae{n + 1}"

    def add(self, sae: SAE) -> None:
        with self._lock:
            if (sae.owner, sae.id) in self._saes:
                raise SaeError(f"you already have an SAE {sae.id!r}: unload it first or pick another id")
            self._saes[(sae.owner, sae.id)] = sae

    def get(self, owner: str, sae_id: Any) -> SAE:
        if type(sae_id) is not str:
            raise SaeError(f"an SAE is named by its id (a text), got {type(sae_id).__name__}")
        with self._lock:
            sae = self._saes.get((owner, sae_id))
            known = sorted(i for o, i in self._saes if o == owner)
        if sae is None:
            raise SaeError(f"no SAE {sae_id[:40]!r} is loaded; yours: {', '.join(known) or 'none'} "
                           "(client.load_sae loads one)")
        return sae

    def owned(self, owner: str) -> list[SAE]:
        with self._lock:
            return [s for (o, _), s in sorted(self._saes.items()) if o == owner]

    def remove(self, owner: str, sae_id: str) -> None:
        with self._lock:
            self._saes.pop((owner, sae_id), None)

    def held_bytes(self, owner: str | None = None) -> int:
        """Bytes the SAEs of ``owner`` (of everyone: None) hold."""
        with self._lock:
            return sum(s.nbytes for (o, _), s in self._saes.items() if owner is None or o == owner)
