"""The public Python API: :func:`connect`, :class:`Client` and :class:`Run`.

A ``Run`` is a handle: its state lives on the server, and each property reads
the summary that came back with the last call (``refresh()`` asks again).
Tensors cross only when asked for (``activation()``, ``logits()``); every step
reply carries the generated ids, the top-k next tokens and activation
statistics, a few KB however large the model.
"""
from __future__ import annotations

import atexit
import math
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from ..serving import sidechannel, wire
from ..errors import ActivationError, BadRequestError, BreakpointError, DjinnError, error_from_wire
from ..serving.protocol import DEFAULT_PORT, PROTOCOL
from ..serving.transport import open_connection

if TYPE_CHECKING:
    from ..serving.server import DjinnServer

__all__ = ["connect", "Client", "Run"]


def _call(conn_fn: Any, *args: Any) -> Any:
    """Call an exposed method; raise the server's error locally, return its result."""
    try:
        reply = conn_fn(*args)
    except EOFError as e:
        raise DjinnError(f"connection to the djinn server was lost: {e}") from None
    payload = None
    if isinstance(reply, tuple):
        reply, payload = reply
    msg = wire.loads(reply, "server reply")
    if not msg.get("ok"):
        err = msg.get("error") or {}
        raise error_from_wire(err.get("kind", "DjinnError"), err.get("message", "unknown server error"))
    return (msg["result"], payload) if payload is not None else msg["result"]


def _edit_args(
    client: "Client",
    activation: torch.Tensor | None,
    scale: float | None,
    add: torch.Tensor | Sequence[float] | None,
    original: bool = False,
):
    spec: dict[str, Any] = {"original": True} if original else {}
    act_bytes = add_bytes = None
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ActivationError(f"scale must be a finite number, got {scale!r}")
        spec["scale"] = float(scale)
    if activation is not None:
        if not isinstance(activation, torch.Tensor):
            raise BadRequestError(f"activation must be a torch.Tensor, got {type(activation).__name__}")
        spec["activation"], act_bytes = client._tensor_in(activation)
    if add is not None:
        if not isinstance(add, torch.Tensor):
            add = torch.tensor(add, dtype=torch.float32)
        spec["add"], add_bytes = client._tensor_in(add)
    return wire.dumps(spec), act_bytes, add_bytes


class Run:
    """A generation on the server: paused at a breakpoint, done, failed or closed."""

    def __init__(self, client: "Client", summary: dict[str, Any]):
        self._client = client
        self._s = summary

    # ----- where it is ------------------------------------------------------------
    @property
    def id(self) -> str:
        return self._s["id"]

    @property
    def state(self) -> str:
        return self._s["state"]

    @property
    def paused(self) -> bool:
        return self.state == "paused"

    @property
    def done(self) -> bool:
        return self.state == "done"

    @property
    def layer(self) -> int | None:
        return self._s["layer"]

    @property
    def step(self) -> int:
        return self._s["step"]

    @property
    def token_ids(self) -> list[int]:
        return list(self._s["token_ids"])

    @property
    def text(self) -> str:
        return self._client.decode(self.token_ids)

    @property
    def prompt_len(self) -> int:
        return self._s["prompt_len"]

    @property
    def prompt_ids(self) -> list[int]:
        return list(self._s["prompt_ids"])

    @property
    def client(self) -> "Client":
        """The client this run is reached through."""
        return self._client

    @property
    def parent(self) -> str | None:
        return self._s.get("parent")

    @property
    def error(self) -> str | None:
        return self._s.get("error")

    @property
    def topk(self) -> list[tuple[int, float]] | None:
        """(token id, log-probability) of the most likely next tokens after the last finished step."""
        tk = self._s.get("topk")
        return [tuple(x) for x in tk] if tk else None

    @property
    def activation_stats(self) -> dict[str, Any] | None:
        """Shape, dtype, norm/mean/max overall and per position of the paused activation."""
        return self._s.get("activation")

    @property
    def bytes_held(self) -> int:
        return self._s["bytes_held"]

    @property
    def timings_ms(self) -> dict[str, float]:
        return dict(self._s.get("timings_ms") or {})

    @property
    def summary(self) -> dict[str, Any]:
        return dict(self._s)

    # ----- tensors ----------------------------------------------------------------
    def activation(self, original: bool = False) -> torch.Tensor:
        """The paused activation on this machine's CPU, (batch, positions, hidden).

        With ``original=True``: the block's own output, before any ``edit``.
        """
        return self._client._tensor_out("activation", self.id, bool(original))

    def logits(self, step: int | None = None) -> torch.Tensor:
        """Next-token logits (vocab,) of the last finished step, or of ``step`` if recorded."""
        return self._client._tensor_out("logits", self.id, step)

    # ----- control ----------------------------------------------------------------
    def resume(
        self,
        activation: torch.Tensor | None = None,
        scale: float | None = None,
        add: Any = None,
        original: bool = False,
    ) -> "Run":
        """Continue to the next breakpoint or the end, after replacing/scaling/adding to the activation.

        The edit applies to the pending activation (see :meth:`edit`); ``original=True``
        starts from the block's own output instead.
        """
        args = _edit_args(self._client, activation, scale, add, original)
        self._s = _call(self._client._remote("resume"), self.id, *args)
        return self

    def fork(
        self,
        activation: torch.Tensor | None = None,
        scale: float | None = None,
        add: Any = None,
        breakpoints: Iterable[Any] | None = None,
        max_new_tokens: int | None = None,
        original: bool = False,
    ) -> "Run":
        """A new run continued from this checkpoint with the edit; this run stays paused as it was.

        ``breakpoints=None`` keeps this run's breakpoints; ``[]`` runs the fork to its end.
        ``max_new_tokens`` changes how long the fork generates (it must exceed the paused step).
        ``original=True`` starts from the block's own output, ignoring earlier :meth:`edit` calls.
        """
        bps = None if breakpoints is None else wire.dumps(_plain_breakpoints(breakpoints))
        args = _edit_args(self._client, activation, scale, add, original)
        s = _call(self._client._remote("fork"), self.id, *args, bps, max_new_tokens)
        return Run(self._client, s)

    def offload(self) -> "Run":
        """Move this paused run's KV cache and checkpoint to the server's host memory.

        The next resume/fork/edit/activation brings it back to the device transparently.
        """
        self._s = _call(self._client._remote("offload"), self.id)
        return self

    @property
    def offloaded(self) -> bool:
        return bool(self._s.get("offloaded"))

    def watched(self) -> list[dict[str, Any]]:
        """Every watch hit so far: index, layer, step, shape, norm/mean/max (overall and per position)."""
        return _call(self._client._remote("watched"), self.id)

    def watched_activation(self, index: int) -> torch.Tensor:
        """The block output recorded by watch hit ``index`` (see :meth:`watched`)."""
        return self._client._tensor_out("watched_activation", self.id, index)

    def edit(self, activation: torch.Tensor | None = None, scale: float | None = None, add: Any = None) -> "Run":
        """Change the paused activation on the server; later resume/fork start from it."""
        self._s = _call(self._client._remote("edit"), self.id, *_edit_args(self._client, activation, scale, add))
        return self

    def reset(self) -> "Run":
        """Undo edits: the paused activation is the block's own output again."""
        self._s = _call(self._client._remote("reset_edit"), self.id)
        return self

    def refresh(self) -> "Run":
        self._s = _call(self._client._remote("status"), self.id)
        return self

    def run_to_end(self) -> "Run":
        """Resume unmodified until the run is done (a convenience for scripts)."""
        while self.paused:
            self.resume()
        return self

    def close(self) -> None:
        """Free the run's server memory now."""
        if self.state != "closed":
            _call(self._client._remote("close"), self.id)
            self._s = {**self._s, "state": "closed"}

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.close()
        except DjinnError:
            pass

    def _repr_html_(self) -> str:
        from ..notebook.display import run_html

        return run_html(self)

    def __repr__(self) -> str:
        where = f" at layer {self.layer} step {self.step}" if self.paused else ""
        return f"<djinn Run {self.id} {self.state}{where}, {len(self._s['token_ids'])} tokens>"


def _plain_breakpoints(bps: Iterable[Any]) -> list[Any]:
    if isinstance(bps, (int, str, tuple, dict)):
        bps = [bps]
    if not isinstance(bps, (list, set, range)) and not hasattr(bps, "__iter__"):
        raise BreakpointError(f"breakpoints must be a list of layer, (layer, step) or dict, got {type(bps).__name__}")
    out = []
    for b in bps:
        if isinstance(b, tuple):
            b = list(b)
        if hasattr(b, "as_dict"):
            b = b.as_dict()
        out.append(b)
    return out


class Client:
    """A connection to a djinn server (remote, or embedded in this process)."""

    def __init__(self, host: str, port: int, token: str | None = None):
        self._conn = open_connection(host, port)
        self._methods: dict[str, Any] = {}
        try:
            self._info = _call(self._remote("hello"), PROTOCOL, token)
        except Exception:
            self._conn.close()
            raise
        self.address = f"{host}:{port}"
        self.host = host
        _open_clients.add(self)

    def _tensor_out(self, name: str, *args: Any) -> torch.Tensor:
        """A tensor from the server: inline for small ones, over the side channel for large ones."""
        result = _call(self._remote(name), *args, True)
        if isinstance(result, dict) and "bulk" in result:
            return sidechannel.fetch(self.host, result["bulk"])
        meta, data = result
        return wire.decode_tensor(meta, data, max_bytes=1 << 40)

    def _tensor_in(self, t: torch.Tensor) -> tuple[dict[str, Any], bytes | None]:
        """(spec, inline bytes) for a tensor sent to the server; large ones go ahead on the side channel."""
        if t.numel() * t.element_size() < sidechannel.BULK_THRESHOLD:
            return wire.encode_tensor(t)
        meta = {"dtype": wire.dtype_name(t.dtype), "shape": list(t.shape)}
        slot = _call(self._remote("expect"), wire.dumps(meta))
        sidechannel.push(self.host, slot, t)
        return {"ticket": slot["ticket"]}, None

    def _remote(self, name: str) -> Any:
        """The server's ``exposed_<name>``, looked up once: every attribute access on an
        rpyc reference is a round trip, so a call through ``conn.root.name`` costs two."""
        fn = self._methods.get(name)
        if fn is None:
            fn = self._methods[name] = getattr(self._conn.root, name)
        return fn

    @property
    def info(self) -> dict[str, Any]:
        """model, num_layers, hidden_size, device, dtype, and more."""
        return dict(self._info)

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 16,
        breakpoints: Iterable[Any] | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
        record_logits: bool = False,
        watches: Iterable[Any] | None = None,
    ) -> Run:
        """Start a run; returns it paused at its first breakpoint, or done.

        ``breakpoints`` pause the run: ``6`` (layer 6, prompt pass), ``(6, 3)`` (4th
        decoding call), ``(6, "all")``. ``watches`` take the same form but only record
        the block's output on the server (``run.watched()``), without pausing.
        ``record_logits`` keeps every step's next-token logits (``run.logits(step)``).
        """
        if not isinstance(prompt, str):
            prompt = [int(t) for t in prompt]
        args = {
            "prompt": prompt,
            "max_new_tokens": max_new_tokens,
            "breakpoints": None if breakpoints is None else _plain_breakpoints(breakpoints),
            "watches": None if watches is None else _plain_breakpoints(watches),
            "temperature": temperature,
            "top_k": top_k,
            "seed": seed,
            "record_logits": record_logits,
        }
        return Run(self, _call(self._remote("generate"), wire.dumps(args)))

    def runs(self) -> list[dict[str, Any]]:
        """This client's runs on the server: id, state, layer, step, bytes held."""
        return _call(self._remote("runs"))

    def attach(self, run_id: str) -> Run:
        """A live handle on an existing run (after a kernel restart, say)."""
        return Run(self, _call(self._remote("status"), run_id))

    def tokenize(self, text: str) -> list[int]:
        return _call(self._remote("tokenize"), text)

    def decode(self, ids: Sequence[int]) -> str:
        return _call(self._remote("decode"), wire.dumps([int(i) for i in ids]))

    def close(self) -> None:
        """Close the connection. Paused runs stay on the server until closed or their lease ends;
        an embedded server lives as long as this Python process."""
        self._conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _repr_html_(self) -> str:
        from ..notebook.display import client_html

        return client_html(self)

    def __repr__(self) -> str:
        i = self._info
        return f"<djinn Client {i['model']} ({i['num_layers']} layers, {i['device']}, {i['dtype']}) at {self.address}>"


_embedded: dict[tuple, DjinnServer] = {}
_embedded_lock = threading.Lock()
_open_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()


@atexit.register
def _shutdown() -> None:
    """Close connections before the embedded servers' daemon threads die with the interpreter
    (otherwise a connection's finalizer waits forever for a server that is gone)."""
    for client in list(_open_clients):
        try:
            client._conn.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    with _embedded_lock:
        for server in _embedded.values():
            server.close()
        _embedded.clear()


def connect(
    address: str | None = None,
    *,
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    token: str | None = None,
) -> Client:
    """Connect to a djinn server.

    ``connect("host:port", token=...)`` reaches a running ``djinn-server``.
    ``connect(model=..., device=...)`` (no address) loads the model into an
    embedded server on loopback in this process and talks to it over the same
    rpyc protocol; the model is loaded once per (model, device, dtype); the
    device defaults to ``"cpu"``.
    ``connect()`` uses the embedded default model.
    """
    token = token if token is not None else os.environ.get("DJINN_TOKEN")
    if address is not None:
        given = [k for k, v in (("model", model), ("device", device), ("dtype", dtype)) if v is not None]
        if given:
            raise BadRequestError(
                f"pass either an address or {'/'.join(given)}=..., not both: a running server has chosen them"
            )
        host, _, port = address.rpartition(":")
        if not host:
            host, port = address, str(DEFAULT_PORT)
        if not port.isdigit():
            raise BadRequestError(f"address must be 'host:port', got {address!r}")
        return Client(host, int(port), token)
    from ..serving.server import DjinnServer, build_engine

    device = device or "cpu"
    key = (model or "embedded", device, dtype)
    with _embedded_lock:
        server = _embedded.get(key)
        if server is None:
            server = DjinnServer(build_engine(model, device, dtype), "127.0.0.1", 0).start()
            _embedded[key] = server
    return Client("127.0.0.1", server.port, None)
