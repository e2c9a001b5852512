"""The rpyc service: the ``exposed_`` calls one connection can make.

Only ``exposed_`` methods are reachable; each takes and returns plain values
(JSON text, bytes, ints) and checks their types itself, because rpyc would
otherwise hand it remote references to client objects. Errors return as
``{"ok": false, "error": {"kind", "message"}}`` so the client can raise the same
class without the server's traceback. Runs belong to the token that made them.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import inspect
import logging
from typing import Any, Callable

import rpyc

from ..core.engine import Engine
from ..core.runs import Run, activation_stats
from ..core.specs import Edit, Sampling
from ..errors import AuthenticationError, BadRequestError, DjinnError, ProtocolError
from ..schema import EditRequest, ForkRequest, GenerateRequest
from ..version import __version__
from . import sidechannel, wire
from .protocol import PROTOCOL
from .transport import FastChannel

log = logging.getLogger("djinn_nb.serving.service")


def owner_of(token: str | None) -> str:
    """Runs are filed under a digest of the token, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:16] if token else ""


class ServerState:
    """What all connections share: the engine, the token and the limits."""

    def __init__(
        self,
        engine: Engine,
        token: str | None = None,
        max_payload: int = wire.DEFAULT_MAX_PAYLOAD,
        max_paused_bytes: int | None = None,
        bulk: sidechannel.BulkServer | None = None,
    ):
        self.engine = engine
        self.token = token or None
        self.max_payload = max_payload
        self.max_paused_bytes = max_paused_bytes
        self.bulk = bulk

    def after_change(self, run: Run) -> None:
        """Apply the residency budget once a call has left ``run`` paused or done."""
        if self.max_paused_bytes is not None:
            self.engine.enforce_budget(self.max_paused_bytes, keep=run.id)


def _reply(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an exposed call; turn its result or a ``DjinnError`` into JSON text."""

    signature = inspect.signature(fn)
    name = fn.__name__.removeprefix("exposed_")
    params = list(signature.parameters.values())[1:]
    if any(p.kind != p.POSITIONAL_OR_KEYWORD for p in params):  # the arity check below counts positions only
        raise TypeError(f"{fn.__name__}: exposed calls take plain positional parameters")
    least = sum(p.default is inspect.Parameter.empty for p in params)
    arity = f"{least}" if least == len(params) else f"{least} to {len(params)}"

    @functools.wraps(fn)
    def wrapper(self: "DjinnService", *args: Any) -> Any:
        try:
            if not least <= len(args) <= len(params):  # what signature.bind checked, at a tenth of the cost
                raise BadRequestError(f"{name} takes {arity} arguments, got {len(args)}")
            result = fn(self, *args)
        except DjinnError as e:
            return wire.dumps({"ok": False, "error": {"kind": e.kind, "message": str(e)}})
        except Exception as e:  # noqa: BLE001 - a bug must not leak a traceback or kill the connection
            log.exception("internal error in %s", fn.__name__)
            return wire.dumps({"ok": False, "error": {"kind": "DjinnError", "message": f"internal server error: {type(e).__name__}: {e}"}})
        if isinstance(result, tuple):  # (meta, payload)
            meta, payload = result
            return wire.dumps({"ok": True, "result": meta}), payload
        return wire.dumps({"ok": True, "result": result})  # non-finite floats become null

    return wrapper


def _str(value: Any, what: str) -> str:
    if type(value) is not str or not value or len(value) > 256:
        raise BadRequestError(f"{what} must be a non-empty string")
    return value


class DjinnService(rpyc.Service):
    """One instance per connection; ``hello`` must come first."""

    def __init__(self, state: ServerState):
        self._state = state
        self._owner: str | None = None
        self._channel: FastChannel | None = None

    def on_connect(self, conn: rpyc.Connection) -> None:
        channel = getattr(conn, "_channel", None)
        self._channel = channel if isinstance(channel, FastChannel) else None

    # ----- helpers ----------------------------------------------------------------
    @property
    def _engine(self) -> Engine:
        return self._state.engine

    def _who(self) -> str:
        if self._owner is None:
            raise AuthenticationError("call hello(protocol, token) first")
        return self._owner

    def _edit(self, req: EditRequest, act: Any, add: Any) -> Edit:
        return Edit(
            activation=self._tensor_arg(req.activation, act, "activation"),
            scale=req.scale,
            add=self._tensor_arg(req.add, add, "add"),
            original=req.original,
            heads=None if req.heads is None else tuple(req.heads),
        )

    def _tensor_arg(self, meta: Any, data: Any, what: str) -> Any:
        """A tensor sent inline (header + bytes) or uploaded on the side channel ({"ticket"})."""
        if meta is None:
            if data is not None:
                raise BadRequestError(f"{what} bytes were sent without an {what} header")
            return None
        if isinstance(meta, dict) and set(meta) == {"ticket"}:
            if self._state.bulk is None or data is not None:
                raise BadRequestError(f"{what}: a side-channel ticket comes alone, to a server with a side channel")
            return self._state.bulk.take(meta["ticket"], self._who())
        return wire.decode_tensor(meta, data, self._state.max_payload)

    def _send(self, t: Any, bulk: Any) -> Any:
        """A tensor for the client: inline, or (asked for, and large) offered on the side channel."""
        if type(bulk) is not bool:
            raise BadRequestError("bulk must be true or false")
        nbytes = t.numel() * t.element_size()
        if bulk and self._state.bulk is not None and nbytes >= sidechannel.BULK_THRESHOLD:
            return {"bulk": self._state.bulk.offer(t, self._who())}
        return wire.encode_tensor(t)

    # ----- exposed calls ----------------------------------------------------------
    @_reply
    def exposed_hello(self, protocol: Any, token: Any) -> dict[str, Any]:
        """Check protocol version and token; returns the server's info."""
        if type(protocol) is not int or protocol != PROTOCOL:
            raise ProtocolError(
                f"client speaks protocol {protocol!r}, server djinn_nb {__version__} speaks {PROTOCOL}: "
                "install the same djinn_nb version on both sides"
            )
        if token is not None and type(token) is not str:
            raise BadRequestError("token must be a string or None")
        expected = self._state.token
        if expected is not None and not (token and hmac.compare_digest(token.encode(), expected.encode())):
            raise AuthenticationError("wrong or missing token: pass token=... (or set DJINN_TOKEN)")
        self._owner = owner_of(token if expected is not None else None)
        if self._channel is not None:  # authenticated: frames up to a tensor payload plus framing
            self._channel.max_frame = self._state.max_payload + (1 << 20)
        return {"server_version": __version__, "protocol": PROTOCOL, **self._engine.info()}

    @_reply
    def exposed_info(self) -> dict[str, Any]:
        self._who()
        return self._engine.info()

    @_reply
    def exposed_generate(self, request_json: Any) -> dict[str, Any]:
        """Start a run (a ``GenerateRequest``); its summary at its first pause or its end."""
        owner = self._who()
        req = GenerateRequest.from_json(wire.loads(request_json, "generate request"))
        run = self._engine.generate(
            req.prompt,
            req.max_new_tokens,
            req.breakpoints,
            Sampling(req.temperature, req.top_k, req.seed),
            owner=owner,
            record_logits=req.record_logits,
            watches=req.watches,
        )
        self._state.after_change(run)
        return run.summary().to_json()

    @_reply
    def exposed_resume(self, run_id: Any, request_json: Any, act: Any = None, add: Any = None) -> dict[str, Any]:
        """Continue a paused run after an ``EditRequest`` (tensors inline in ``act``/``add`` or by ticket)."""
        owner = self._who()
        edit = self._edit(EditRequest.from_json(wire.loads(request_json, "edit")), act, add)
        run = self._engine.resume(_str(run_id, "run id"), edit, owner)
        self._state.after_change(run)
        return run.summary().to_json()

    @_reply
    def exposed_fork(self, run_id: Any, request_json: Any, act: Any = None, add: Any = None) -> dict[str, Any]:
        """A new run from a paused one's checkpoint, after a ``ForkRequest``."""
        owner = self._who()
        req = ForkRequest.from_json(wire.loads(request_json, "fork request"))
        edit = self._edit(req.edit, act, add)
        run = self._engine.fork(_str(run_id, "run id"), edit, req.breakpoints, owner, req.max_new_tokens)
        self._state.after_change(run)
        return run.summary().to_json()

    @_reply
    def exposed_offload(self, run_id: Any) -> dict[str, Any]:
        """Move a paused run's state to host memory; later calls bring it back."""
        return self._engine.offload(_str(run_id, "run id"), self._who()).summary().to_json()

    @_reply
    def exposed_watched(self, run_id: Any) -> list[dict[str, Any]]:
        """Statistics of every watch hit so far: layer, site, step, shape and norm/mean/max."""
        hits = self._engine.watched(_str(run_id, "run id"), self._who())
        return [
            {"index": i, "layer": h.layer, "site": h.site, "step": h.step, "shape": list(h.tensor.shape),
             **activation_stats(h.tensor)}
            for i, h in enumerate(hits)
        ]

    @_reply
    def exposed_watched_activation(self, run_id: Any, index: Any, bulk: Any = False) -> Any:
        hits = self._engine.watched(_str(run_id, "run id"), self._who())
        if type(index) is not int or not 0 <= index < len(hits):
            raise BadRequestError(f"watch index must be an integer in 0..{len(hits) - 1}, got {index!r}")
        return self._send(hits[index].tensor, bulk)

    @_reply
    def exposed_edit(self, run_id: Any, request_json: Any, act: Any = None, add: Any = None) -> dict[str, Any]:
        owner = self._who()
        edit = self._edit(EditRequest.from_json(wire.loads(request_json, "edit")), act, add)
        return self._engine.edit(_str(run_id, "run id"), edit, owner).summary().to_json()

    @_reply
    def exposed_reset_edit(self, run_id: Any) -> dict[str, Any]:
        return self._engine.reset_edit(_str(run_id, "run id"), self._who()).summary().to_json()

    @_reply
    def exposed_activation(self, run_id: Any, original: Any = False, bulk: Any = False) -> Any:
        """The paused activation: ``(header, bytes)``, or ``{"bulk": ticket}`` (see sidechannel.py)."""
        if type(original) is not bool:
            raise BadRequestError("original must be true or false")
        t = self._engine.activation(_str(run_id, "run id"), self._who(), original)
        return self._send(t, bulk)

    @_reply
    def exposed_lens(self, run_id: Any, k: Any = 5) -> dict[str, Any]:
        """The logit lens at a residual-stream pause: per position, top-k ids and probabilities."""
        ids, probs = self._engine.lens(_str(run_id, "run id"), k, self._who())
        return {"ids": ids.tolist(), "probs": probs.tolist()}

    @_reply
    def exposed_lens_grid(self, request_json: Any) -> dict[str, Any]:
        """{prompt, k, site}: the lens at every layer of one prompt pass, (layers, positions, k)."""
        self._who()
        req = wire.loads(request_json, "lens grid request")
        if not isinstance(req, dict) or "prompt" not in req or set(req) - {"prompt", "k", "site"}:
            raise BadRequestError("lens_grid takes {'prompt': text or ids, 'k': int, 'site': str}")
        if not isinstance(req["prompt"], (str, list)):
            raise BadRequestError("prompt must be a string or a list of token ids")
        ids, probs = self._engine.lens_grid(req["prompt"], req.get("k", 1), req.get("site", "resid_post"))
        return {"ids": ids.tolist(), "probs": probs.tolist()}

    @_reply
    def exposed_attention(self, run_id: Any, bulk: Any = False) -> Any:
        """Block N's attention probabilities at the paused step, (batch, heads, queries, keys)."""
        return self._send(self._engine.attention(_str(run_id, "run id"), self._who()), bulk)

    @_reply
    def exposed_expect(self, meta_json: Any) -> dict[str, Any]:
        """Reserve a side-channel upload of a tensor with this header; returns {port, ticket}."""
        if self._state.bulk is None:
            raise BadRequestError("this server has no side channel")
        return self._state.bulk.expect(wire.loads(meta_json, "tensor header"), self._state.max_payload, self._who())

    @_reply
    def exposed_logits(self, run_id: Any, step: Any = None, bulk: Any = False) -> Any:
        """Next-token logits of the last finished step, or of ``step`` if the run recorded them."""
        run = self._engine.get(_str(run_id, "run id"), self._who())
        with run.lock:
            if step is None:
                if run.last_logits is None:
                    raise BadRequestError(f"run {run.id} has finished no step yet")
                return self._send(run.last_logits, bulk)
            if type(step) is not int or not 0 <= step < len(run.logits):
                raise BadRequestError(
                    f"step {step!r} not recorded: run {run.id} has logits for steps 0..{len(run.logits) - 1} "
                    "(start it with record_logits=True)"
                )
            return self._send(run.logits[step], bulk)

    @_reply
    def exposed_status(self, run_id: Any) -> dict[str, Any]:
        return self._engine.get(_str(run_id, "run id"), self._who()).summary().to_json()

    @_reply
    def exposed_runs(self) -> list[dict[str, Any]]:
        runs = sorted(self._engine.runs(self._who()), key=lambda r: int(r.id[1:].split("-")[0]))
        return [r.summary(detail=False).row().to_json() for r in runs]

    @_reply
    def exposed_close(self, run_id: Any) -> dict[str, Any]:
        self._engine.close(_str(run_id, "run id"), self._who())
        return {"id": run_id, "state": "closed"}

    @_reply
    def exposed_tokenize(self, text: Any) -> list[int]:
        self._who()
        if type(text) is not str:
            raise BadRequestError("text must be a string")
        return self._engine.encode(text)

    @_reply
    def exposed_decode(self, ids_json: Any) -> str:
        self._who()
        ids = wire.loads(ids_json, "token ids")
        if not isinstance(ids, list) or any(type(i) is not int for i in ids):
            raise BadRequestError("token ids must be a list of ints")
        return self._engine.decode(ids)
