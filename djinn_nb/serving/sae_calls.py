"""The exposed calls of sparse autoencoders: load, list, unload, read features (the checks that
a feature condition or a clamp names an SAE its caller loaded, at the right place, are
``requests.py``'s).

Why a module of its own: an SAE is an allocation a user asks for like a run (its weights
are counted to them, refused before they are read if over their share, and capped in
number: ``Limits.user_max_saes``), and a server path is input from the network: the path
must name a directory holding SAELens's two files, and no error may quote what a file holds
(see :mod:`djinn_nb.core.saes`). Uploading the weights from the client is not offered: an
SAE is read from the server's own disk.

A class given the caller (a :class:`~djinn_nb.serving.parts.Caller`: its name, the engine, the
byte checks) and the texts replies carry (:class:`~djinn_nb.serving.parts.Replies`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from ..conditions import feature_terms
from ..core.features import read_features
from ..core.saes import SAE, SaeRegistry, inspect_dir, load_tensors, parse_hook
from ..errors import BadRequestError, BreakpointError, QuotaError, SaeError
from .. import wire
from ..wire.calls import FeaturesReply, FeaturesRequest, LoadSaeRequest, SaeInfo, SaeUnloaded
from .parts import Caller, Replies
from .replies import _str

if TYPE_CHECKING:  # pragma: no cover
    from ..core.engine import Engine

__all__ = ["SaeCalls"]


class SaeCalls:
    """``load_sae``, ``saes``, ``unload_sae``, ``features``."""

    def __init__(self, caller: Caller, replies: Replies):
        self._caller = caller
        self._replies = replies

    @property
    def _engine(self) -> Engine:
        return self._caller.engine

    @property
    def _saes(self) -> SaeRegistry:
        return self._engine.stepper.saes

    # ----- calls (the service's exposed_<name>) -------------------------------------
    def load_sae(self, request_json: Any) -> dict[str, Any]:
        """{path, site (null: the cfg's hook), id (null: saeN)}: an SAE in SAELens's format read
        from a directory on the server, on the model's device and dtype; its description."""
        owner = self._caller.who()
        req = _request(LoadSaeRequest, request_json, "load_sae takes {'path': a directory on the server, "
                       "'site': (layer, site) or a hook name or null, 'id': a name or null}")
        engine, limits = self._engine, self._caller.state.limits
        cap = getattr(limits, "user_max_saes", None)
        have = len(self._saes.owned(owner))
        if cap is not None and have >= cap:
            raise QuotaError(f"quota user_max_saes: you have {have} SAEs loaded, of {cap}; unload one first",
                             quota="user_max_saes")
        files = inspect_dir(req.path, getattr(limits, "sae_dirs", None))
        site = req.site
        if site is None:
            if files.hook is None:
                raise SaeError("cfg.json names no hook: pass site=(layer, site) or 'blocks.N.hook_resid_pre'")
            site = files.hook
        layer, name = parse_hook(site, engine.num_layers)
        try:
            engine.check_site(layer, name)
        except BreakpointError as e:
            raise SaeError(f"an SAE at layer {layer} {name}: {e}") from None
        width = _site_width(engine, layer, name)
        if files.reshape_z != (name == "z") or (width is not None and files.d_in != width):
            raise SaeError(f"this SAE reads vectors of d_in={files.d_in}"
                           f"{' (heads flattened)' if files.reshape_z else ''}; layer {layer} {name} of this "
                           f"model has {width if width is not None else 'another shape'}"
                           f"{' (heads x head_dim, flattened)' if name == 'z' else ''}")
        sae_id = self._saes.new_id(owner, req.id)
        nbytes = files.numel * engine.dtype.itemsize
        self._caller.check_bytes(owner, adding=nbytes)  # refused before a byte is read
        sae = SAE.build(sae_id, owner, layer, name, files, load_tensors(files), engine.device, engine.dtype)
        self._saes.add(sae)
        try:
            self._caller.check_bytes(owner)  # another call may have taken the room meanwhile
            now = len(self._saes.owned(owner))
            if cap is not None and now > cap:  # or the last slot, from another connection of this user
                raise QuotaError(f"quota user_max_saes: you have {now - 1} SAEs loaded, of {cap}; unload one first",
                                 quota="user_max_saes")
        except QuotaError:
            self._saes.remove(owner, sae_id)
            raise
        return SaeInfo(**sae.describe()).to_json()

    def saes(self) -> list[dict[str, Any]]:
        """The caller's loaded SAEs."""
        return [SaeInfo(**s.describe()).to_json() for s in self._saes.owned(self._caller.who())]

    def unload_sae(self, sae_id: Any) -> dict[str, Any]:
        """Free an SAE; refused while a run of the caller's has a condition reading it."""
        owner = self._caller.who()
        sae = self._saes.get(owner, _str(sae_id, "SAE id"))
        for run in self._engine.runs(owner):
            for b in run.breakpoints:
                cond = b.condition
                if cond is not None and any(s == sae.id for s, _ in feature_terms(cond)):
                    raise SaeError(f"run {run.id} has a breakpoint whose condition reads SAE {sae.id}: "
                                   "close that run first")
        self._saes.remove(owner, sae.id)
        self._caller.state.freed.set()
        return SaeUnloaded(sae.id).to_json()

    def features(self, run_id: Any, request_json: Any) -> dict[str, Any]:
        """{sae, k} or {sae, ids}: at a pause at the SAE's place, per position the top-k (feature,
        activation) or the chosen features' activations; with the positions' token ids and texts."""
        owner = self._caller.who()
        req = _request(FeaturesRequest, request_json,
                       "features takes {'sae': an SAE id, 'k': int} or {'sae': id, 'ids': [feature ids]}")
        sae = self._saes.get(owner, req.sae)
        run = self._engine.get(_str(run_id, "run id"), owner)
        cp = run.checkpoint
        positions = int(cp.pending.shape[1]) if cp is not None and cp.pending.dim() >= 2 else 1  # (batch, positions, ...)
        self._caller.check_bytes(owner, adding=sae.work_bytes(positions))  # admitted before it is encoded
        ids, values = read_features(self._engine, run.id, owner, sae, req.k, req.ids)
        seq = list(run.prompt_ids) + list(run.token_ids)
        step = run.checkpoint.step if run.checkpoint is not None else run.step
        tokens = seq[:len(run.prompt_ids)] if step == 0 else seq[len(run.prompt_ids) + step - 1:][:1]
        tokens = tokens if len(tokens) == len(ids) else []  # a length the table cannot pair is not shown
        texts = self._replies.token_texts(tokens)
        return FeaturesReply(sae=sae.id, layer=sae.layer, site=sae.site, step=step, ids=ids, values=values,
                             token_ids=tokens, texts=[texts[t] for t in tokens] if texts else None).to_json()


R = TypeVar("R", LoadSaeRequest, FeaturesRequest)


def _request(cls: type[R], request_json: Any, usage: str) -> R:
    """A request read through its class; refused as an ``SaeError`` saying what the call takes."""
    try:
        return cls.from_json(wire.loads(request_json, f"{usage.split()[0]} request"))
    except BadRequestError as e:
        raise SaeError(f"{usage}: {e}"[:400]) from None


def _site_width(engine: Engine, layer: int, site: str) -> int | None:
    """The width of an activation at a site (heads × head_dim at z); None where unknown."""
    cfg = engine.model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if site != "z":
        return hidden if isinstance(hidden, int) else None
    heads = engine.parts[layer].num_heads or getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if isinstance(hidden, int) and heads else None)
    return heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else None
