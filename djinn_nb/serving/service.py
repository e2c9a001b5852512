"""The rpyc service: the ``exposed_`` calls one connection can make.

Only ``exposed_`` methods are reachable; each takes and returns plain values
(JSON text, bytes, ints) and checks their types itself, because rpyc would
otherwise hand it remote references to client objects. Errors return as
``{"ok": false, "error": {"kind", "message"}}`` so the client can raise the same
class without the server's traceback. Runs belong to the token that made them.
"""
from __future__ import annotations

import contextlib
import hmac
import logging
import select
from typing import Any

import rpyc

from ..core.engine import Engine
from ..core.runs import Run, activation_stats
from ..core.scheduler import call_scope
from ..core.specs import Edit, Sampling
from ..errors import AuthenticationError, BadRequestError, DjinnError, ProtocolError, QuotaError
from ..schema import EditRequest, ForkRequest, GenerateRequest, LensReply
from ..version import __version__
from .. import wire
from ..wire import sidechannel
from .branch_calls import BranchCalls
from .debug_calls import DebugCalls
from .objects import bound_objects
from .patching_calls import PatchingCalls
from .sae_calls import SaeCalls
from .state import ServerState
from .text_calls import TextCalls
from ..wire.protocol import PROTOCOL
from .replies import _reply, _since, _str
from ..wire.transport import FastChannel
from .users import User

log = logging.getLogger("djinn_nb.serving.service")


def prompt_positions(prompt: Any) -> int:
    """At most how many positions a prompt takes: its ids, or a text's UTF-8 bytes (a byte-level
    tokenizer makes at most one token per byte)."""
    if isinstance(prompt, str):
        return len(prompt.encode("utf-8", "surrogatepass"))
    return len(prompt) if isinstance(prompt, list) else 0


class DjinnService(TextCalls, DebugCalls, BranchCalls, SaeCalls, PatchingCalls, rpyc.Service):
    """One instance per connection; ``hello`` must come first."""

    def __init__(self, state: ServerState):
        self._state = state
        self._owner: str | None = None
        self._user: User | None = None
        self._channel: FastChannel | None = None
        self._conn: rpyc.Connection | None = None
        self._peer = "?"

    def on_connect(self, conn: rpyc.Connection) -> None:
        bound_objects(conn)  # a peer that never releases what it looks up cannot grow the server without end
        channel = getattr(conn, "_channel", None)
        self._channel = channel if isinstance(channel, FastChannel) else None
        self._conn = conn
        try:
            self._peer = str(conn._config["endpoints"][1][0])
        except (KeyError, IndexError, TypeError):
            pass

    def on_disconnect(self, conn: rpyc.Connection) -> None:
        if self._owner is not None:
            with self._state.connections_lock:
                self._state.connections[self._owner] -= 1
                if self._state.connections[self._owner] <= 0:
                    del self._state.connections[self._owner]
        if self._state.bulk is not None:
            self._state.bulk.release(id(self))  # this connection's unfetched downloads and uploads

    def _rpyc_getattr(self, name: str) -> Any:
        """Before ``hello`` succeeds, ``hello`` is the only name a peer can even look up."""
        call = "exposed_" + name.removeprefix("exposed_")  # rpyc's own check is bypassed by this override
        if self._owner is None and call != "exposed_hello":
            raise AttributeError("call hello(protocol, token) first")
        if not getattr(getattr(type(self), call, None), "djinn_call", False):
            raise AttributeError(f"cannot access {name!r}")
        return getattr(self, call)

    def _alive(self) -> bool:
        """Whether the client is still connected (a peer's FIN shows as POLLRDHUP, unread data or not)."""
        if self._channel is None:
            return True
        try:
            fd = self._channel.stream.sock.fileno()
            p = select.poll()
            p.register(fd, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            return not p.poll(0)
        except (AttributeError, OSError, ValueError):
            return False

    def _caller(self) -> Any:
        """Every call runs as its caller (after hello): a lens, an attention read, a lens_grid or an
        offload then waits its turn on the device among that user's calls, not as an anonymous
        one ahead of or behind everyone's. Calls that step set a deadline too (``_scope``)."""
        if self._owner is None:
            return contextlib.nullcontext()
        return call_scope(self._owner, self._alive)

    def _scope(self) -> Any:
        limits = self._state.limits
        return call_scope(self._who(), self._alive, getattr(limits, "max_call_seconds", None))

    def _check_quota(self, max_new_tokens: int | None = None, new_runs: int = 1, adding: int = 0) -> None:
        """Refuse, before anything changes, a call that would take this user (or the server) past a
        quota: its steps, its user's runs (``new_runs`` more), and the bytes all runs hold plus
        ``adding``, the call's estimate of what it will allocate (see ``ServerState.kv_bytes``)."""
        owner, user, limits = self._who(), self._user, self._state.limits
        steps = getattr(limits, "max_call_steps", None)
        if steps is not None and type(max_new_tokens) is int and max_new_tokens > steps:
            raise QuotaError(f"quota max_call_steps: a call may run at most {steps} steps; "
                             f"asked for max_new_tokens={max_new_tokens}", quota="max_call_steps")
        cap = user.max_runs if user is not None and user.max_runs is not None else getattr(limits, "user_max_runs", None)
        if new_runs and cap is not None:
            held = len(self._engine.runs(owner))
            if held + new_runs > cap:
                more = f"; {new_runs} more would pass it" if new_runs > 1 else ""
                raise QuotaError(f"quota max_runs: you hold {held} of {cap} runs{more}; close some first",
                                 quota="max_runs")
        self._check_bytes(owner, adding)

    def _check_bytes(self, owner: str, adding: int = 0) -> None:
        user, limits = self._user, self._state.limits
        own = user is not None and user.max_paused_bytes is not None
        cap = user.max_paused_bytes if own and user is not None else getattr(limits, "user_max_held_bytes", None)
        need = f" and this call would add about {adding}" if adding else ""
        if cap is not None:
            held = self._state.held_bytes(owner)
            if held + adding > cap:
                name = "max_paused_bytes" if own else "user_max_held_bytes"
                raise QuotaError(f"quota {name}: your runs hold {held} bytes{need}, over your {cap}; "
                                 "close or shorten some runs", quota=name)
        total = getattr(limits, "max_held_bytes", None)
        if total is not None:
            held = self._state.held_bytes()
            if held + adding > total:
                # an ordinary user is not told what everyone else holds
                numbers = f" ({held} bytes held{need}, of {total})" if self._admin else ""
                raise QuotaError(f"quota max_held_bytes: the server's runs are at its limit of what they may "
                                 f"hold{numbers}; try again after runs are closed, or ask for less",
                                 quota="max_held_bytes")

    def _admit(self, run: Run) -> None:
        """A new run that took its owner (or the server) past a byte quota is closed and refused."""
        self._admit_all([run])

    def _admit_all(self, runs: list[Run]) -> None:
        """New runs of one call that took their owner (or the server) past a byte quota are all
        closed and the call refused: a caller never holds part of a refused batch."""
        try:
            self._check_bytes(self._who())
        except QuotaError as e:
            for run in runs:
                with contextlib.suppress(DjinnError):
                    self._engine.close(run.id, run.owner)
            self._state.freed.set()
            raise QuotaError(f"{e}; the {len(runs)} run(s) this call made were closed" if len(runs) > 1 else str(e),
                             quota=e.quota) from None

    # ----- helpers ----------------------------------------------------------------
    @property
    def _engine(self) -> Engine:
        return self._state.engine

    @property
    def _admin(self) -> bool:
        return self._user is not None and self._user.admin

    def _who(self) -> str:
        if self._owner is None:
            raise AuthenticationError("call hello(protocol, token) first")
        user, users = self._user, self._state.auth.users  # one snapshot: a reload swaps the whole dict
        if user is not None and users.get(user.name) is not user:  # the users file was reloaded
            now = users.get(user.name)
            if now is None or not hmac.compare_digest(now.token_sha256, user.token_sha256):
                raise AuthenticationError("this server no longer accepts your token (its users file changed); "
                                          "connect again with a current one")
            self._user = now  # its quotas as the file now says
        return self._owner

    def _edit(self, req: EditRequest, act: Any, add: Any) -> Edit:
        return Edit(
            activation=self._tensor_arg(req.activation, act, "activation"),
            scale=req.scale,
            add=self._tensor_arg(req.add, add, "add"),
            original=req.original,
            heads=None if req.heads is None else tuple(req.heads),
            patch_from=req.patch_from,
            positions=None if req.positions is None else tuple(req.positions),
            clamp=self._clamp(req.clamp),
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
            return {"bulk": self._state.bulk.offer(t, self._who(), id(self))}
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
        if self._owner is not None:
            raise BadRequestError("hello was already said on this connection")
        user = self._state.auth.authenticate(token, self._peer)
        owner = user.name if user is not None else ""
        cap = getattr(self._state.limits, "user_max_connections", None)
        with self._state.connections_lock:  # one user's connections cannot take every slot
            held = self._state.connections[owner]
            if cap is not None and held >= cap:
                raise QuotaError(f"quota user_max_connections: you have {held} connections open, of {cap}; "
                                 "close one first", quota="user_max_connections")
            self._state.connections[owner] += 1
        self._user, self._owner = user, owner
        self._state.on_hello(self._conn)
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
        self._check_features(req.breakpoints)
        self._check_quota(req.max_new_tokens, adding=self._state.kv_bytes(prompt_positions(req.prompt)
                                                                           + req.max_new_tokens))
        with self._scope():
            run = self._engine.generate(
                req.prompt,
                req.max_new_tokens,
                req.breakpoints,
                Sampling(req.temperature, req.top_k, req.seed),
                owner=owner,
                record_logits=req.record_logits,
                watches=req.watches,
            )
        self._admit(run)
        self._state.after_change(run)
        return self._summary(run)

    @_reply
    def exposed_resume(self, run_id: Any, since: Any = None, request_json: Any = None, act: Any = None,
                       add: Any = None) -> dict[str, Any]:
        """Continue a paused run, after an ``EditRequest`` if one is given (tensors inline in
        ``act``/``add`` or by ticket); its ``RunBrief`` (``since``: token ids the client holds)."""
        owner = self._who()
        edit = None if request_json is None else self._edit(EditRequest.from_json(wire.loads(request_json, "edit")),
                                                             act, add)
        since = _since(since)
        run = self._engine.get(_str(run_id, "run id"), owner)
        self._check_quota(new_runs=0, adding=self._state.kv_bytes(run.max_new_tokens - run.step))
        with self._scope():
            run = self._engine.resume(_str(run_id, "run id"), edit, owner)
        self._state.after_change(run)
        return self._brief(run, since)

    @_reply
    def exposed_fork(self, run_id: Any, request_json: Any, act: Any = None, add: Any = None,
                     since: Any = None) -> dict[str, Any]:
        """A new run from a paused one's checkpoint, after a ``ForkRequest``; its ``RunBrief``
        (``since``: how many of the parent's token ids the client holds)."""
        owner = self._who()
        since = _since(since)
        req = ForkRequest.from_json(wire.loads(request_json, "fork request"))
        self._check_features(req.breakpoints)
        edit = self._edit(req.edit, act, add)
        parent = self._engine.get(_str(run_id, "run id"), owner)
        limit = req.max_new_tokens if req.max_new_tokens is not None else parent.max_new_tokens
        self._check_quota(limit, adding=self._state.kv_bytes(len(parent.prompt_ids) + limit))
        with self._scope():
            run = self._engine.fork(parent.id, edit, req.breakpoints, owner, req.max_new_tokens)
        self._admit(run)
        self._state.after_change(run)
        return self._closed_brief(run, since) if req.close else self._brief(run, since, new=True)

    @_reply
    def exposed_offload(self, run_id: Any, since: Any = None) -> dict[str, Any]:
        """Move a paused run's state to host memory; later calls bring it back."""
        since = _since(since)
        return self._brief(self._engine.offload(_str(run_id, "run id"), self._who()), since)

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
    def exposed_edit(self, run_id: Any, request_json: Any, act: Any = None, add: Any = None,
                     since: Any = None) -> dict[str, Any]:
        owner = self._who()
        edit = self._edit(EditRequest.from_json(wire.loads(request_json, "edit")), act, add)
        since = _since(since)
        return self._brief(self._engine.edit(_str(run_id, "run id"), edit, owner), since)

    @_reply
    def exposed_reset_edit(self, run_id: Any, since: Any = None) -> dict[str, Any]:
        since = _since(since)
        return self._brief(self._engine.reset_edit(_str(run_id, "run id"), self._who()), since)

    @_reply
    def exposed_activation(self, run_id: Any, original: Any = False, bulk: Any = False) -> Any:
        """The paused activation: ``(header, bytes)``, or ``{"bulk": ticket}`` (see sidechannel.py)."""
        if type(original) is not bool:
            raise BadRequestError("original must be true or false")
        t = self._engine.activation(_str(run_id, "run id"), self._who(), original)
        return self._send(t, bulk)

    @_reply
    def exposed_lens(self, run_id: Any, k: Any = 5) -> dict[str, Any]:
        """The logit lens at a residual-stream pause: per position, top-k ids and probabilities, and
        the text of each id it names and of the run's own tokens (``text_ids``/``texts``: the
        table the caller shows next, with its positions' tokens)."""
        run = self._engine.get(_str(run_id, "run id"), self._who())
        top_ids, probs = self._engine.lens(run.id, k, self._who())
        ids = top_ids.tolist()
        texts = self._token_texts([i for row in ids for i in row] + list(run.prompt_ids) + list(run.token_ids))
        return LensReply(ids, probs.tolist(), list(texts), list(texts.values())).to_json()

    @_reply
    def exposed_lens_grid(self, request_json: Any) -> tuple[dict[str, Any], bytes]:
        """{prompt, k, site}: the lens at every layer of one prompt pass, (layers, positions, k): the
        headers ``{"ids", "probs"}`` and one payload, the ids' bytes then the probabilities'."""
        self._who()
        req = wire.loads(request_json, "lens grid request")
        if not isinstance(req, dict) or "prompt" not in req or set(req) - {"prompt", "k", "site"}:
            raise BadRequestError("lens_grid takes {'prompt': text or ids, 'k': int, 'site': str}")
        if not isinstance(req["prompt"], (str, list)):
            raise BadRequestError("prompt must be a string or a list of token ids")
        # admitted on its prompt pass's cache (one hidden state per layer rides with it)
        self._check_quota(1, new_runs=0, adding=self._state.kv_bytes(max(1, prompt_positions(req["prompt"]))))
        ids, probs = self._engine.lens_grid(req["prompt"], req.get("k", 1), req.get("site", "resid_post"))
        # as tensors, not JSON lists: layers x positions x k numbers cost ~6 ms of JSON a call
        (ids_meta, ids_bytes), (probs_meta, probs_bytes) = wire.encode_tensor(ids), wire.encode_tensor(probs)
        return {"ids": ids_meta, "probs": probs_meta}, ids_bytes + probs_bytes

    @_reply
    def exposed_attention(self, run_id: Any, bulk: Any = False) -> Any:
        """Block N's attention probabilities at the paused step, (batch, heads, queries, keys)."""
        return self._send(self._engine.attention(_str(run_id, "run id"), self._who()), bulk)

    @_reply
    def exposed_expect(self, meta_json: Any) -> dict[str, Any]:
        """Reserve a side-channel upload of a tensor with this header; returns {port, ticket}."""
        if self._state.bulk is None:
            raise BadRequestError("this server has no side channel")
        meta = wire.loads(meta_json, "tensor header")
        _, _, nbytes = wire.check_header(meta, self._state.max_payload)
        self._check_bytes(self._who(), adding=nbytes)  # a reservation counts to its user, like a run
        return self._state.bulk.expect(meta, self._state.max_payload, self._who(), id(self))

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
    def exposed_status(self, run_id: Any, since: Any = None) -> dict[str, Any]:
        """Where the run is now, as a ``RunBrief`` (``since``: token ids the client holds)."""
        since = _since(since)
        return self._brief(self._engine.get(_str(run_id, "run id"), self._who()), since)

    @_reply
    def exposed_summary(self, run_id: Any) -> dict[str, Any]:
        """Everything about the run (a ``RunSummary``): tokens, prompt, breakpoints, the paused
        activation's statistics, the top-k, bytes held, timings."""
        return self._summary(self._engine.get(_str(run_id, "run id"), self._who()))

    @_reply
    def exposed_runs(self) -> list[dict[str, Any]]:
        """This user's runs; an admin's listing has every user's."""
        owner = self._who()
        mine = self._engine.all_runs() if self._admin else self._engine.runs(owner)
        runs = sorted(mine, key=lambda r: int(r.id[1:].split("-")[0]))
        return [r.row() for r in runs]

    @_reply
    def exposed_close(self, run_id: Any) -> dict[str, Any]:
        owner = self._who()
        run_id = _str(run_id, "run id")
        if self._admin:  # an admin closes any run, as its owner would
            owner = next((r.owner for r in self._engine.all_runs() if r.id == run_id), owner)
        self._engine.close(run_id, owner)
        self._state.freed.set()
        return {"id": run_id, "state": "closed"}
