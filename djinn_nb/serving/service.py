"""The rpyc service: one connection, and the ``exposed_`` calls it can make.

Only ``exposed_`` methods are reachable; each takes and returns plain values
(JSON text, bytes, ints) and checks their types itself, because rpyc would
otherwise hand it remote references to client objects. Errors return as
``{"ok": false, "error": {"kind", "message"}}`` so the client can raise the same
class without the server's traceback. Runs belong to the token that made them.

The service is the connection: ``hello``, the lookup of a call, connect and disconnect. The calls
themselves belong to call groups, each a class with one job given narrow, typed interfaces
(``parts.py``) — never the service itself:

- :class:`~djinn_nb.serving.context.CallContext` (the caller: who, scope, quotas, admission),
- :class:`~djinn_nb.serving.transfers.Transfers` (tensors in and out; ``expect``),
- :class:`~djinn_nb.serving.text_calls.TextCalls` (decoding; the texts replies carry),
- :class:`~djinn_nb.serving.requests.Requests` (edits and breakpoints' feature conditions, checked),
- :class:`~djinn_nb.serving.run_calls.RunCalls` (start, move, edit, list and close runs),
- :class:`~djinn_nb.serving.read_calls.ReadCalls` (activation, logits, attention, lens, watches),
- :class:`~djinn_nb.serving.debug_calls.DebugCalls` (fork_many, stepping, rewind, history, causal_trace),
- :class:`~djinn_nb.serving.branch_calls.BranchCalls`, :class:`~djinn_nb.serving.sae_calls.SaeCalls`,
  :class:`~djinn_nb.serving.patching_calls.PatchingCalls`.

Each ``exposed_<name>`` below hands its arguments to its group's ``<name>`` (``replies.served``),
after the checks every call makes (``replies._reply``).
"""
from __future__ import annotations

import logging
import select
from typing import Any

import rpyc

from ..errors import BadRequestError, ProtocolError, QuotaError
from ..wire.messages import HelloReply
from ..version import __version__
from ..wire.protocol import PROTOCOL
from ..wire.transport import FastChannel
from .branch_calls import BranchCalls
from .context import CallContext
from .debug_calls import DebugCalls
from .objects import bound_objects
from .patching_calls import PatchingCalls
from .read_calls import ReadCalls
from .replies import _reply, served
from .requests import Requests
from .run_calls import RunCalls
from .sae_calls import SaeCalls
from .state import ServerState
from .text_calls import TextCalls
from .transfers import Transfers

__all__ = ["DjinnService"]

log = logging.getLogger("djinn_nb.serving.service")


class DjinnService(rpyc.Service):
    """One instance per connection; ``hello`` must come first."""

    def __init__(self, state: ServerState):
        self._state = state
        self._channel: FastChannel | None = None
        self._conn: rpyc.Connection | None = None
        self._peer = "?"
        self._ctx = ctx = CallContext(state, self._alive)
        self._tensors = Transfers(ctx, id(self))
        self._texts = TextCalls(ctx)
        self._saes = SaeCalls(ctx, self._texts)
        requests = Requests(ctx, self._tensors)
        self._runs = RunCalls(ctx, self._texts, requests)
        self._reads = ReadCalls(ctx, self._texts, self._tensors)
        self._debug = DebugCalls(ctx, self._texts, requests)
        self._branches = BranchCalls(ctx, self._texts)
        self._patching = PatchingCalls(ctx, self._texts)

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
        owner = self._ctx.owner
        if owner is not None:
            with self._state.connections_lock:
                self._state.connections[owner] -= 1
                if self._state.connections[owner] <= 0:
                    del self._state.connections[owner]
        if self._state.bulk is not None:
            self._state.bulk.release(id(self))  # this connection's unfetched downloads and uploads

    def _rpyc_getattr(self, name: str) -> Any:
        """Before ``hello`` succeeds, ``hello`` is the only name a peer can even look up."""
        call = "exposed_" + name.removeprefix("exposed_")  # rpyc's own check is bypassed by this override
        if self._ctx.owner is None and call != "exposed_hello":
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

    @_reply
    def exposed_hello(self, protocol: Any, token: Any) -> dict[str, Any]:
        """Check protocol version and token; returns the server's info (a ``HelloReply``)."""
        if type(protocol) is not int or protocol != PROTOCOL:
            raise ProtocolError(
                f"client speaks protocol {protocol!r}, server djinn_nb {__version__} speaks {PROTOCOL}: "
                "install the same djinn_nb version on both sides"
            )
        if token is not None and type(token) is not str:
            raise BadRequestError("token must be a string or None")
        if self._ctx.owner is not None:
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
        self._ctx.login(user)
        self._state.on_hello(self._conn)
        if self._channel is not None:  # authenticated: frames up to a tensor payload plus framing
            self._channel.max_frame = self._state.max_payload + (1 << 20)
        return HelloReply(server_version=__version__, protocol=PROTOCOL, **self._state.engine.info()).to_json()

    # ----- the calls, each handed to its group ------------------------------------
    exposed_info = served("_runs", RunCalls.info)
    exposed_generate = served("_runs", RunCalls.generate)
    exposed_resume = served("_runs", RunCalls.resume)
    exposed_fork = served("_runs", RunCalls.fork)
    exposed_edit = served("_runs", RunCalls.edit)
    exposed_reset_edit = served("_runs", RunCalls.reset_edit)
    exposed_offload = served("_runs", RunCalls.offload)
    exposed_status = served("_runs", RunCalls.status)
    exposed_summary = served("_runs", RunCalls.summary)
    exposed_runs = served("_runs", RunCalls.runs)
    exposed_close = served("_runs", RunCalls.close)

    exposed_activation = served("_reads", ReadCalls.activation)
    exposed_logits = served("_reads", ReadCalls.logits)
    exposed_attention = served("_reads", ReadCalls.attention)
    exposed_lens = served("_reads", ReadCalls.lens)
    exposed_lens_grid = served("_reads", ReadCalls.lens_grid)
    exposed_watched = served("_reads", ReadCalls.watched)
    exposed_watched_activation = served("_reads", ReadCalls.watched_activation)

    exposed_expect = served("_tensors", Transfers.expect)

    exposed_tokenize = served("_texts", TextCalls.tokenize)
    exposed_decode = served("_texts", TextCalls.decode)
    exposed_decode_each = served("_texts", TextCalls.decode_each)
    exposed_decode_many = served("_texts", TextCalls.decode_many)

    exposed_fork_many = served("_debug", DebugCalls.fork_many)
    exposed_token_probs = served("_debug", DebugCalls.token_probs)
    exposed_next_layer = served("_debug", DebugCalls.next_layer)
    exposed_next_step = served("_debug", DebugCalls.next_step)
    exposed_step_through = served("_debug", DebugCalls.step_through)
    exposed_rewind = served("_debug", DebugCalls.rewind)
    exposed_causal_trace = served("_debug", DebugCalls.causal_trace)
    exposed_history = served("_debug", DebugCalls.history)

    exposed_diff = served("_branches", BranchCalls.diff)

    exposed_load_sae = served("_saes", SaeCalls.load_sae)
    exposed_saes = served("_saes", SaeCalls.saes)
    exposed_unload_sae = served("_saes", SaeCalls.unload_sae)
    exposed_features = served("_saes", SaeCalls.features)

    exposed_attribution_patching = served("_patching", PatchingCalls.attribution_patching)
