"""The connection: :func:`connect` and :class:`Client` (one rpyc connection to a server).

``connect()`` reaches a running ``djinn-server``, the per-user local server (``local.py``), or an
embedded one in this process; either way the client speaks the same rpyc protocol, with requests and
summaries typed by :mod:`djinn_nb.wire.messages` and tensors as ``(dtype, shape, bytes)``.

Over a real network each round trip is the link's latency, so every call is one rpyc
request (the method's name travels with its arguments: no lookup first), and texts are
decoded in bulk and kept: a sequence's or a token's text, once known (decoded, or carried
by a reply), is never asked for again on this connection.
"""
from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from rpyc.core import consts

from .. import wire
from ..wire import sidechannel
from ..errors import BadRequestError, DjinnError, NoTokenizerError, ProtocolError, error_from_wire
from ..wire.calls import (DecodeManyReply, DecodeManyRequest, ExpectReply, LensGridRequest, TokenProbsRequest,
                            read_reply)
from ..wire.messages import GenerateRequest, HelloReply, RunRow, RunSummary
from ..wire.protocol import DEFAULT_PORT, PROTOCOL
from ..wire.tls import client_context
from ..wire.transport import default_spin_s, open_connection
from .features import Sae, Saes
from .edits import plain_breakpoints
from .run import Run

if TYPE_CHECKING:
    import torch  # imported at the first tensor: connecting and generating text need none

    from ..serving.server import DjinnServer

__all__ = ["connect", "Client"]


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


def _spin_seconds(spin_us: Any) -> float:
    if isinstance(spin_us, bool) or not isinstance(spin_us, int) or not 0 <= spin_us <= 100_000:
        raise BadRequestError(f"spin_us must be an integer from 0 to 100000 (microseconds), got {spin_us!r}")
    return spin_us / 1e6


#: Seconds to connect and say hello: a server that does not answer (say, a TLS server to a plain
#: client, or the reverse) is reported, never waited on.
HELLO_SECONDS = 15.0
#: The most this client accepts in one tensor from a server, whatever the server announces.
MAX_DOWNLOAD_BYTES = 8 << 30
#: How many decoded sequences a client keeps (the oldest go first); single tokens' texts are all kept.
TEXT_CACHE = 4096


def _hello(reply: Any) -> dict[str, Any]:
    """hello's reply, checked (a ``HelloReply``): the server's version, protocol and info."""
    try:
        return HelloReply.from_json(reply).to_json()
    except BadRequestError as e:  # the server's reply, not this caller's request, is at fault
        raise ProtocolError(f"hello: {e}") from None


class Client:
    """A connection to a djinn server (remote, or embedded in this process).

    ``tls=True`` verifies the server's certificate against the system CAs, ``tls_ca=FILE``
    against that CA only (hostname included, on both channels). ``max_download_bytes``
    caps any one tensor or frame the server may send.
    """

    def __init__(self, host: str, port: int, token: str | None = None, tls: bool = False,
                 tls_ca: str | None = None, max_download_bytes: int = MAX_DOWNLOAD_BYTES,
                 spin_us: int | None = None):
        self._ssl = client_context(tls, tls_ca)
        self.max_download_bytes = max_download_bytes
        spin_s = default_spin_s() if spin_us is None else _spin_seconds(spin_us)
        # an unreachable address raises OSError (ConnectionRefusedError, ...); TLS failures TransportError
        self._conn = open_connection(host, port, HELLO_SECONDS, self._ssl, max_frame=max_download_bytes + (1 << 20),
                                     spin_s=spin_s)
        self._methods: dict[str, Any] = {}
        self._texts: OrderedDict[tuple[int, ...], str] = OrderedDict()  # decoded sequences
        self._token_texts: dict[int, str] = {}  # each token id's own text
        self._text_lock = threading.Lock()
        self._saes = Saes(self)  # the SAE calls (client/features.py)
        config = self._conn._config
        try:
            config["sync_request_timeout"] = HELLO_SECONDS
            self._info = _hello(_call(self._remote("hello"), PROTOCOL, token))
        except TimeoutError:
            self._conn.close()
            raise DjinnError(f"the djinn server at {host}:{port} did not answer hello within {HELLO_SECONDS:g} s "
                             "(a TLS server reached without tls=..., or not a djinn server?)") from None
        except (DjinnError, EOFError) as e:
            self._conn.close()
            if isinstance(e, DjinnError) and "connection to the djinn server was lost" not in str(e):
                raise
            hint = " (if the server uses TLS, connect with tls=True or tls_ca=FILE)" if self._ssl is None else ""
            raise DjinnError(f"the djinn server at {host}:{port} closed the connection before hello{hint}") from None
        except Exception:
            self._conn.close()
            raise
        finally:
            config["sync_request_timeout"] = 3600
        self.address = f"{host}:{port}"
        self.host = host
        _open_clients.add(self)

    def _tensor_out(self, name: str, *args: Any) -> torch.Tensor:
        """A tensor from the server: inline for small ones, over the side channel for large ones."""
        result = _call(self._remote(name), *args, True)
        if isinstance(result, dict) and "bulk" in result:
            return sidechannel.fetch(self.host, result["bulk"], self.max_download_bytes, ssl_context=self._ssl)
        meta, data = result
        return wire.decode_tensor(meta, data, max_bytes=self.max_download_bytes)

    def _tensor_in(self, t: torch.Tensor) -> tuple[dict[str, Any], bytes | None]:
        """(spec, inline bytes) for a tensor sent to the server; large ones go ahead on the side channel."""
        if t.numel() * t.element_size() < sidechannel.BULK_THRESHOLD:
            return wire.encode_tensor(t)
        meta = {"dtype": wire.dtype_name(t.dtype), "shape": list(t.shape)}
        slot = read_reply("expect", ExpectReply, _call(self._remote("expect"), wire.dumps(meta))).to_json()
        sidechannel.push(self.host, slot, t, ssl_context=self._ssl)
        return {"ticket": slot["ticket"]}, None

    def _run_id(self, run: Any) -> Any:
        """A ``Run``'s id; anything else as it is (checked where it is used)."""
        return run.id if isinstance(run, Run) else run

    def _call(self, name: str, *args: Any) -> Any:
        """Call the server's ``exposed_<name>``; its result, or its error raised here."""
        return _call(self._remote(name), *args)

    def _remote(self, name: str) -> Any:
        """A caller of the server's ``exposed_<name>`` that sends one rpyc request per call
        (``callattr``: the name with the arguments), where ``conn.root.name(...)`` costs two, an
        attribute lookup then the call. The server checks the name as it does a lookup."""
        fn = self._methods.get(name)
        if fn is None:
            conn, root = self._conn, self._conn.root

            def fn(*args: Any) -> Any:
                return conn.sync_request(consts.HANDLE_CALLATTR, root, name, args, ())

            self._methods[name] = fn
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
        req = GenerateRequest(
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            breakpoints=None if breakpoints is None else plain_breakpoints(breakpoints),
            watches=None if watches is None else plain_breakpoints(watches),
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            record_logits=record_logits,
        )
        return Run(self, RunSummary.from_json(self._call("generate", wire.dumps(req.to_json()))))

    def runs(self) -> list[dict[str, Any]]:
        """This client's runs on the server, one dict each (``djinn_nb.wire.messages.RunRow``'s fields):
        id, state, layer, site, step, tokens, bytes_held, offloaded, parent, idle_s."""
        rows = self._call("runs")
        if type(rows) is not list:
            raise ProtocolError(f"runs: expected a list of rows, got {type(rows).__name__}")
        try:
            return [RunRow.checked(r) for r in rows]
        except BadRequestError as e:  # the server's reply, not this caller's request, is at fault
            raise ProtocolError(f"runs: {e}") from None

    def lens_grid(self, prompt: str | Sequence[int], k: int = 1, site: str = "resid_post") -> dict[str, torch.Tensor]:
        """The logit lens at ``site`` of every layer for one prompt pass, recorded without pausing:
        ``{"ids": (layers, positions, k) long, "probs": (layers, positions, k) float}``."""
        if not isinstance(prompt, str):
            prompt = [int(t) for t in prompt]
        reply = self._call("lens_grid", wire.dumps(LensGridRequest(prompt, k, site).to_json()))
        if not (type(reply) is tuple and len(reply) == 2 and type(reply[0]) is dict and reply[0].keys() == {"ids", "probs"}
                and type(reply[1]) is bytes):
            raise ProtocolError("lens_grid: expected the ids' and probabilities' headers and one payload")
        try:
            (meta, data), cut = reply, wire.check_header(reply[0]["ids"], self.max_download_bytes)[2]
            ids = wire.decode_tensor(meta["ids"], data[:cut], max_bytes=self.max_download_bytes)
            probs = wire.decode_tensor(meta["probs"], data[cut:], max_bytes=self.max_download_bytes)
        except BadRequestError as e:  # the server's reply, not this caller's request, is at fault
            raise ProtocolError(f"lens_grid: {e}") from None
        return {"ids": ids.long(), "probs": probs}

    def token_probs(self, runs: Sequence[Run | str], token: int) -> list[float]:
        """Each run's probability of ``token`` at its last finished step, computed on the server."""
        ids = [self._run_id(r) for r in runs]
        return self._call("token_probs", wire.dumps(TokenProbsRequest(ids, token).to_json()))

    # ----- sparse autoencoders (client/features.py) --------------------------------
    def load_sae(self, path: str, site: Any = None, id: str | None = None, labels: Any = None) -> Sae:
        """Load an SAE saved in SAELens's format (``cfg.json`` + ``sae_weights.safetensors``) from
        ``path``, a directory on the *server's* disk, onto the model's device and dtype.

        ``site``: ``(layer, site)`` or a hook name (``"blocks.8.hook_resid_pre"``); by default the
        hook its ``cfg.json`` names. ``id``: the name conditions and clamps use (default ``saeN``).
        ``labels``: feature labels for tables (a dict or a JSON file on this machine).
        Its weights count to your bytes quota, like a run's.
        """
        return self._saes.load(path, site, id, labels)

    def saes(self) -> list[Sae]:
        """Your loaded SAEs (without labels: those stay with the handle ``load_sae`` returned)."""
        return self._saes.loaded()

    def unload_sae(self, sae: Any) -> None:
        """Free an SAE on the server (refused while one of your runs has a condition reading it)."""
        self._saes.unload(sae)

    def attach(self, run_id: str) -> Run:
        """A live handle on an existing run (after a kernel restart, say)."""
        return Run(self, RunSummary.from_json(self._call("summary", run_id)))

    def tokenize(self, text: str) -> list[int]:
        return _call(self._remote("tokenize"), text)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (no call if this connection has decoded them, or been sent their text)."""
        return self.decode_many([ids])[0]

    def decode_each(self, ids: Sequence[int]) -> list[str]:
        """The text of each token on its own (one call for those not yet known, none if all are)."""
        ids = [int(i) for i in ids]
        self.decode_many([], ids)
        return [self._token_texts[i] for i in ids]

    def decode_many(self, sequences: Sequence[Sequence[int]], tokens: Sequence[int] = ()) -> list[str]:
        """The text of each sequence; the texts of ``tokens``, each on its own, come with them
        (``decode_each`` then has them). One call for all that this connection does not know yet."""
        seqs = [tuple(int(i) for i in s) for s in sequences]
        for s in seqs:  # one token's text is its own text: decode([i]) == decode_each([i])[0]
            if len(s) == 1 and s not in self._texts and s[0] in self._token_texts:
                self._remember(s, self._token_texts[s[0]])
        want_seqs = list(dict.fromkeys(s for s in seqs if s not in self._texts))
        want_tokens = list(dict.fromkeys(int(i) for i in tokens if int(i) not in self._token_texts))
        if want_seqs or want_tokens:
            if not self._info.get("has_tokenizer", True):
                raise NoTokenizerError(f"{self._info.get('model')} has no tokenizer to decode with")
            reply = read_reply("decode_many", DecodeManyReply, self._call(
                "decode_many", wire.dumps(DecodeManyRequest([list(s) for s in want_seqs], want_tokens).to_json())))
            texts, token_texts = reply.sequences, reply.tokens
            if len(texts) != len(want_seqs) or len(token_texts) != len(want_tokens):
                raise ProtocolError("decode_many: the server's texts do not match the ids sent")
            got = dict(zip(want_seqs, texts))
            for s, said in got.items():
                self._remember(s, said)
            self._token_texts.update(zip(want_tokens, token_texts))
        else:
            got = {}
        out = []
        for s in seqs:
            text = got.get(s, self._texts.get(s))
            if text is None:  # evicted meanwhile by another thread's texts
                text = self._call("decode", wire.dumps(list(s)))
            out.append(text)
        return out

    def _remember(self, ids: Sequence[int], text: Any, token_texts: dict[int, str] | None = None) -> None:
        """Keep a text a reply carried (or a decode returned) for ``ids``; and tokens' own texts."""
        if type(text) is str:
            key = tuple(ids)
            with self._text_lock:  # the slider's worker thread decodes too
                self._texts[key] = text
                self._texts.move_to_end(key)
                while len(self._texts) > TEXT_CACHE:
                    self._texts.popitem(last=False)
        if token_texts:
            self._token_texts.update(token_texts)

    def close(self) -> None:
        """Close the connection. Paused runs stay on the server until closed or their lease ends;
        an embedded server lives as long as this Python process."""
        self._conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self._info
        return f"<djinn Client {i['model']} ({i['num_layers']} layers, {i['device']}, {i['dtype']}) at {self.address}>"


_UNSET: Any = object()  # connect(lease_seconds=...) not given
#: Where ``connect()`` with no address serves: ``"embedded"`` (in this process) or ``"process"`` (the
#: per-user local server); ``$DJINN_LOCAL`` overrides it.
LOCAL_DEFAULT = "process"


def _local_mode() -> str:
    mode = os.environ.get("DJINN_LOCAL") or LOCAL_DEFAULT
    if mode not in ("embedded", "process"):
        raise BadRequestError(f"DJINN_LOCAL must be 'embedded' or 'process', not {mode!r}"[:120])
    return mode
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
    tls: bool = False,
    tls_ca: str | None = None,
    spin_us: int | None = None,
    lease_seconds: Any = _UNSET,
    embedded: bool | None = None,
) -> Client:
    """Connect to a djinn server.

    ``connect("host:port", token=...)`` reaches a running ``djinn-server``.
    ``connect(model=..., device=...)`` (no address) reaches the per-user local server of that
    (model, device, dtype): a background ``djinn-server`` on loopback, started on first use (the
    model loads then), found by every later connect, from any process, in a tenth of a second
    (``client/local.py``; ``djinn-server status``/``stop``; it exits after 30 minutes with no
    client and no paused run). ``embedded=True`` loads the model into a server inside this
    process instead, once per (model, device, dtype). ``$DJINN_LOCAL`` (``process`` or
    ``embedded``) sets the default. The device defaults to ``"cpu"``; ``connect()`` serves the
    embedded default model. ``tls=True`` (system CAs) or ``tls_ca=FILE`` reach a server started
    with ``--tls-cert``; its certificate and hostname are verified. ``lease_seconds`` (no address):
    close runs untouched this long; the default, ``None``, never expires a run (a local server takes
    it when it starts; a running ``djinn-server`` sets its own with ``--lease-seconds``).
    ``spin_us``: how long to wait on a reply without sleeping, which saves a thread's wake-up on
    quick replies (default: 1000 on machines of 4 cores or more, else 0; an embedded server's client
    never spins, as it shares the GIL with its server).
    """
    token = token if token is not None else os.environ.get("DJINN_TOKEN")
    if address is not None:
        given = [k for k, v in (("model", model), ("device", device), ("dtype", dtype), ("embedded", embedded))
                 if v is not None]
        if lease_seconds is not _UNSET:
            given.append("lease_seconds")
        if given:
            raise BadRequestError(
                f"pass either an address or {'/'.join(given)}=..., not both: the server at {address} has chosen "
                f"them{' (djinn-server --lease-seconds)' if lease_seconds is not _UNSET else ''}"
            )
        host, _, port = address.rpartition(":")
        if not host:
            host, port = address, str(DEFAULT_PORT)
        if not port.isdigit():
            raise BadRequestError(f"address must be 'host:port', got {address!r}")
        return Client(host, int(port), token, tls=tls, tls_ca=tls_ca, spin_us=spin_us)
    if not (_local_mode() == "embedded" if embedded is None else embedded):
        from ..serving.lease import check_lease as _check
        from .local import connect_local

        _check(None if lease_seconds is _UNSET else lease_seconds)
        return connect_local(model, device or "cpu", dtype, None if lease_seconds is _UNSET else lease_seconds,
                             lease_seconds is not _UNSET, lambda port, key: Client("127.0.0.1", port, key, spin_us=spin_us))
    if spin_us:
        raise BadRequestError("spin_us is for a server in another process: an embedded server's client "
                              "would take the GIL from the server it waits on")
    from ..serving.embedded import start_embedded_server
    from ..serving.lease import check_lease

    lease = None if lease_seconds is _UNSET else lease_seconds
    check_lease(lease)
    device = device or "cpu"
    key = (model or "embedded", device, dtype)
    with _embedded_lock:
        server = _embedded.get(key)
        if server is None:
            server = start_embedded_server(model, device, dtype, lease_seconds=lease)
            _embedded[key] = server
        elif lease_seconds is not _UNSET:
            server.lease_seconds = None if lease is None else float(lease)
    return Client("127.0.0.1", server.port, None, spin_us=0)
