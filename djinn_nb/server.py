"""The model server: an rpyc service over :class:`~djinn_nb.engine.Engine`.

Only ``exposed_`` methods are reachable; each takes and returns plain values
(JSON text, bytes, ints) and checks their types itself, because rpyc would
otherwise hand it remote references to client objects. Errors return as
``{"ok": false, "error": {"kind", "message"}}`` so the client can raise the same
class without the server's traceback. Runs belong to the token that made them.

Run ``djinn-server --model M --device cuda:0 --port 5556`` or
``python -m djinn_nb.server``. It binds 127.0.0.1 unless told otherwise, and
refuses any other address without a token.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import hmac
import inspect
import ipaddress
import logging
import os
import sys
import threading
import time
from typing import Any, Callable

import rpyc
from rpyc.utils.server import ThreadedServer

from . import __version__, sidechannel, wire
from .engine import Edit, Engine, Run, Sampling, activation_stats
from .errors import AuthenticationError, BadRequestError, DjinnError, ProtocolError
from .protocol import DEFAULT_PORT, PROTOCOL
from .transport import RPYC_CONFIG, FastChannel, FastSocketStream, tune_socket

DEFAULT_LEASE_SECONDS = 600.0
#: Largest frame a connection may send before ``hello`` succeeds.
UNAUTHENTICATED_FRAME = 64 << 10
log = logging.getLogger("djinn_nb.server")


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    least = sum(p.default is inspect.Parameter.empty for p in params)
    arity = f"{least}" if least == len(params) else f"{least} to {len(params)}"

    @functools.wraps(fn)
    def wrapper(self: "DjinnService", *args: Any) -> Any:
        try:
            try:
                signature.bind(self, *args)
            except TypeError:
                raise BadRequestError(f"{name} takes {arity} arguments, got {len(args)}") from None
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

    def _edit(self, edit_json: Any, act: Any, add: Any) -> Edit:
        spec = wire.loads(edit_json, "edit")
        if not isinstance(spec, dict) or set(spec) - {"scale", "activation", "add", "original"}:
            raise BadRequestError(
                "an edit is {'scale': number, 'activation': header or ticket, 'add': header or ticket, 'original': bool}"
            )
        original = spec.get("original", False)
        if type(original) is not bool:
            raise BadRequestError("original must be true or false")
        edit = Edit(scale=spec.get("scale"), original=original)
        edit.activation = self._tensor_arg(spec.get("activation"), act, "activation")
        edit.add = self._tensor_arg(spec.get("add"), add, "add")
        return edit

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
    def exposed_generate(self, args_json: Any) -> dict[str, Any]:
        """Start a run: {prompt, max_new_tokens, breakpoints, temperature, top_k, seed, record_logits}."""
        owner = self._who()
        a = wire.loads(args_json)
        allowed = {"prompt", "max_new_tokens", "breakpoints", "watches", "temperature", "top_k", "seed", "record_logits"}
        if not isinstance(a, dict) or "prompt" not in a or set(a) - allowed:
            raise BadRequestError(f"generate takes {sorted(allowed)} with 'prompt' required")
        prompt = a["prompt"]
        if not isinstance(prompt, (str, list)):
            raise BadRequestError("prompt must be a string or a list of token ids")
        record = a.get("record_logits", False)
        if type(record) is not bool:
            raise BadRequestError("record_logits must be true or false")
        run = self._engine.generate(
            prompt,
            a.get("max_new_tokens", 16),
            a.get("breakpoints"),
            Sampling(a.get("temperature", 0.0), a.get("top_k", 0), a.get("seed", 0)),
            owner=owner,
            record_logits=record,
            watches=a.get("watches"),
        )
        self._state.after_change(run)
        return run.summary()

    @_reply
    def exposed_resume(self, run_id: Any, edit_json: Any, act: Any = None, add: Any = None) -> dict[str, Any]:
        owner = self._who()
        edit = self._edit(edit_json, act, add)
        run = self._engine.resume(_str(run_id, "run id"), edit, owner)
        self._state.after_change(run)
        return run.summary()

    @_reply
    def exposed_fork(
        self,
        run_id: Any,
        edit_json: Any,
        act: Any = None,
        add: Any = None,
        breakpoints_json: Any = None,
        max_new_tokens: Any = None,
    ) -> dict[str, Any]:
        owner = self._who()
        edit = self._edit(edit_json, act, add)
        bps = None if breakpoints_json is None else wire.loads(breakpoints_json, "breakpoints")
        if bps is not None and not isinstance(bps, list):
            raise BadRequestError("breakpoints must be a list")
        if max_new_tokens is not None and type(max_new_tokens) is not int:
            raise BadRequestError("max_new_tokens must be an integer or None")
        run = self._engine.fork(_str(run_id, "run id"), edit, bps, owner, max_new_tokens)
        self._state.after_change(run)
        return run.summary()

    @_reply
    def exposed_offload(self, run_id: Any) -> dict[str, Any]:
        """Move a paused run's state to host memory; later calls bring it back."""
        return self._engine.offload(_str(run_id, "run id"), self._who()).summary()

    @_reply
    def exposed_watched(self, run_id: Any) -> list[dict[str, Any]]:
        """Statistics of every watch hit so far: layer, step, shape and norm/mean/max."""
        hits = self._engine.watched(_str(run_id, "run id"), self._who())
        return [
            {"index": i, "layer": layer, "step": step, "shape": list(t.shape), **activation_stats(t)}
            for i, (layer, step, t) in enumerate(hits)
        ]

    @_reply
    def exposed_watched_activation(self, run_id: Any, index: Any, bulk: Any = False) -> Any:
        hits = self._engine.watched(_str(run_id, "run id"), self._who())
        if type(index) is not int or not 0 <= index < len(hits):
            raise BadRequestError(f"watch index must be an integer in 0..{len(hits) - 1}, got {index!r}")
        return self._send(hits[index][2], bulk)

    @_reply
    def exposed_edit(self, run_id: Any, edit_json: Any, act: Any = None, add: Any = None) -> dict[str, Any]:
        owner = self._who()
        edit = self._edit(edit_json, act, add)
        return self._engine.edit(_str(run_id, "run id"), edit, owner).summary()

    @_reply
    def exposed_reset_edit(self, run_id: Any) -> dict[str, Any]:
        return self._engine.reset_edit(_str(run_id, "run id"), self._who()).summary()

    @_reply
    def exposed_activation(self, run_id: Any, original: Any = False, bulk: Any = False) -> Any:
        """The paused activation: ``(header, bytes)``, or ``{"bulk": ticket}`` (see sidechannel.py)."""
        if type(original) is not bool:
            raise BadRequestError("original must be true or false")
        t = self._engine.activation(_str(run_id, "run id"), self._who(), original)
        return self._send(t, bulk)

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
        return self._engine.get(_str(run_id, "run id"), self._who()).summary()

    @_reply
    def exposed_runs(self) -> list[dict[str, Any]]:
        runs = sorted(self._engine.runs(self._who()), key=lambda r: int(r.id[1:].split("-")[0]))
        return [_brief(r) for r in runs]

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


def _brief(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "state": run.state,
        "layer": run.layer,
        "step": run.checkpoint.step if run.checkpoint else run.step,
        "tokens": len(run.token_ids),
        "bytes_held": run.bytes_held(),
        "offloaded": run.offloaded,
        "parent": run.parent,
        "idle_s": round(time.monotonic() - run.last_used, 3),
    }


class _FastThreadedServer(ThreadedServer):
    """rpyc's threaded server, over the fast uncompressed channel."""

    def _serve_client(self, sock, credentials):  # noqa: ANN001 - rpyc's signature
        tune_socket(sock)
        config = dict(self.protocol_config, credentials=credentials, endpoints=(sock.getsockname(), sock.getpeername()), logger=self.logger)
        conn = self.service._connect(FastChannel(FastSocketStream(sock), max_frame=UNAUTHENTICATED_FRAME), config)
        self._handle_connection(conn)

    def _handle_connection(self, conn) -> None:  # noqa: ANN001
        try:
            conn.serve_all()
        except OSError:  # the server closed this client's socket while it was being polled
            conn.close()


class DjinnServer:
    """Serve an engine over rpyc; ``start()`` runs it in a background thread.

    Runs untouched for ``lease_seconds`` are closed by a reaper thread (their device
    memory is freed), so a notebook that dies leaks nothing for long, while one
    that restarts within the lease can ``attach`` to its paused runs again.
    """

    def __init__(
        self,
        engine: Engine,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        token: str | None = None,
        max_payload: int = wire.DEFAULT_MAX_PAYLOAD,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_paused_bytes: int | None = None,
    ):
        if not is_loopback(host) and not token:
            raise AuthenticationError(
                f"refusing to bind {host} without a token: pass --token or set DJINN_TOKEN "
                "(clients then connect with token=...)"
            )
        if not lease_seconds > 0:
            raise BadRequestError(f"lease_seconds must be positive, got {lease_seconds!r}")
        self.state = ServerState(engine, token, max_payload, max_paused_bytes)
        self.lease_seconds = float(lease_seconds)
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="djinn-lease-reaper", daemon=True)
        self._server = _FastThreadedServer(
            rpyc.utils.helpers.classpartial(DjinnService, self.state),
            hostname=host,
            port=port,
            protocol_config=dict(RPYC_CONFIG),
            logger=log,
        )
        self._server._listen()  # listen now, so the address is connectable once we return
        self.host, self.port = self._server.host, self._server.port
        self.state.bulk = sidechannel.BulkServer(host)  # after the rpyc port bound: nothing leaks if it fails
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _reap(self) -> None:
        interval = min(5.0, max(0.05, self.lease_seconds / 4))
        while not self._stop.wait(interval):
            for run_id in self.state.engine.expire(self.lease_seconds):
                log.info("lease expired: closed run %s", run_id)

    def start(self) -> "DjinnServer":
        self._reaper.start()
        self._thread = threading.Thread(target=self._server.start, name="djinn-server", daemon=True)
        self._thread.start()
        while not self._server.active:
            time.sleep(0.005)
        return self

    def serve_forever(self) -> None:
        self._reaper.start()
        self._server.start()

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        if self.state.bulk is not None:
            self.state.bulk.close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def build_engine(
    model: str | None,
    device: str,
    dtype: str | None = None,
    device_map: str | None = None,
    seed: int = 0,
    cuda_graphs: bool | None = None,
) -> Engine:
    """Load a model and wrap it in an engine (the exactness probe runs here)."""
    from .models import load_model

    loaded = load_model(model, device=device, dtype=dtype, device_map=device_map, seed=seed)
    return Engine(loaded.model, loaded.tokenizer, loaded.name, cuda_graphs=cuda_graphs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="djinn-server", description="Serve a causal LM with breakpoints over rpyc.")
    p.add_argument("--model", default=None, help="hub id, local directory, 'embedded' (default) or 'random:<shape>'")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 (default cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    p.add_argument("--device-map", default=None, help="'auto' splits the model over GPUs (accelerate)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--token", default=os.environ.get("DJINN_TOKEN"), help="required off loopback (or DJINN_TOKEN)")
    p.add_argument("--max-payload-bytes", type=int, default=wire.DEFAULT_MAX_PAYLOAD)
    p.add_argument("--lease-seconds", type=float, default=DEFAULT_LEASE_SECONDS,
                   help="close runs untouched this long (default 600)")
    p.add_argument("--max-paused-bytes", type=int, default=None,
                   help="offload least-recently-used paused runs to host memory above this many device bytes")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="keep forks on the eager path (default: replay the layers after a checkpoint as a CUDA graph)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not is_loopback(args.host) and not args.token:
        print(
            f"djinn-server: refusing to bind {args.host} without a token; pass --token SECRET or set DJINN_TOKEN",
            file=sys.stderr,
        )
        return 2
    engine = build_engine(args.model, args.device, args.dtype, args.device_map, cuda_graphs=False if args.no_cuda_graphs else None)
    server = DjinnServer(
        engine, args.host, args.port, args.token, args.max_payload_bytes, args.lease_seconds, args.max_paused_bytes
    )
    info = engine.info()
    print(f"djinn-server: {info['model']} ({info['num_layers']} layers) on {info['device']} at {server.address}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
