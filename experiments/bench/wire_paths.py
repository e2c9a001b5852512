"""The transfer paths that ``server.py`` (``python -m experiments.bench.server``) times against each other, one function per path.

Every function moves ``n`` bytes of float32 tensor data over loopback and
returns a list of wall-clock seconds, one per repeat (after one warm-up). The
raw socket paths are the yardstick: one persistent TCP connection, the sender
``sendall``s a buffer it already has, the receiver ``recv_into``s a freshly
allocated, uninitialised one (``torch.empty``, as the side channel does: page
faults are on both sides of the comparison, zero-filling on neither).
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable

import rpyc
import torch
from rpyc.utils.factory import connect_channel

from djinn_nb import wire
from djinn_nb.wire import sidechannel
from djinn_nb.client import Client
from djinn_nb.serving.server import DjinnServer
from djinn_nb.wire.transport import RPYC_CONFIG, FastChannel, FastSocketStream, open_connection, tune_socket


def _timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _recv_exact(sock: socket.socket, n: int) -> memoryview:
    view, got = sidechannel.tensor_view(torch.empty(n, dtype=torch.uint8)), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise EOFError("peer closed")
        got += k
    return view


def _socket_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname()[:2])
    server, _ = listener.accept()
    listener.close()
    for s in (client, server):
        tune_socket(s)
    return client, server


# ----- the yardstick ----------------------------------------------------------------
def raw_oneway(n: int, repeats: int) -> list[float]:
    """Client asks with one byte; server sends ``n`` bytes it holds; client receives them."""
    client, server = _socket_pair()
    src = memoryview(torch.randn(n // 4).numpy()).cast("B")

    def serve() -> None:
        while server.recv(1):
            server.sendall(src)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        return _timed(lambda: (client.sendall(b"x"), _recv_exact(client, len(src))), repeats)
    finally:
        client.close()
        th.join(5)
        server.close()


def raw_echo(n: int, repeats: int) -> list[float]:
    """Client sends ``n`` bytes; server receives them into a new buffer and sends them back."""
    client, server = _socket_pair()
    src = memoryview(torch.randn(n // 4).numpy()).cast("B")

    def serve() -> None:
        try:
            while True:
                server.sendall(_recv_exact(server, len(src)))
        except (EOFError, OSError):
            pass

    th = threading.Thread(target=serve, daemon=True)
    th.start()

    def once() -> None:
        client.sendall(src)
        _recv_exact(client, len(src))

    try:
        return _timed(once, repeats)
    finally:
        client.close()
        th.join(5)
        server.close()


# ----- the real server and client, inline rpyc ---------------------------------------
class StubEngine:
    """Just enough of an Engine for ``hello`` and ``activation``: a preset tensor of any size."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def info(self) -> dict[str, Any]:
        """Every field the server's typed ``hello`` reply carries (an engine's ``info()``)."""
        from djinn_nb.core.threads import describe as describe_threads

        return {"model": "stub", "architecture": "stub", "num_layers": 1, "hidden_size": int(self.tensor.shape[-1]),
                "num_heads": 1, "vocab_size": 1, "device": "cpu", "dtype": "float32", "has_tokenizer": False,
                "block_path": "stub", "sites": ["resid_post"], "parameters": 0, "max_positions": None,
                "generation_config_ignored": [], **describe_threads()}

    def activation(self, run_id: str, owner: str = "", original: bool = False) -> torch.Tensor:
        return self.tensor

    def expire(self, lease_seconds: float) -> list[str]:  # the server's lease reaper asks
        return []


def rpyc_activation(n: int, repeats: int) -> list[float]:
    """``Run.activation()`` through the real DjinnServer and Client (engine stubbed to a preset tensor)."""
    server = DjinnServer(StubEngine(torch.randn(1, n // 4 // 256, 256)), "127.0.0.1", 0).start()
    client = Client("127.0.0.1", server.port)
    try:  # what ``Run.activation()`` sends, without a run summary the stub engine has none of
        return _timed(lambda: client._tensor_out("activation", "r1", False), repeats)
    finally:
        client.close()
        server.close()


# ----- a bench-only service: inline echo, and the side channel as server.py would use it ----
class BenchService(rpyc.Service):
    """Echo a tensor inline; offer/expect/take through a side channel (the proposed integration)."""

    def __init__(self, bulk: sidechannel.BulkServer):
        self._bulk = bulk
        self._held: torch.Tensor | None = None

    def exposed_echo(self, meta_json: Any, data: Any) -> tuple[str, bytes]:
        meta, out = wire.encode_tensor(wire.decode_tensor(wire.loads(meta_json), data))
        return wire.dumps(meta), out

    def exposed_hold(self, nbytes: Any) -> None:
        self._held = torch.randn(int(nbytes) // 4)

    def exposed_offer_held(self) -> str:
        return wire.dumps(self._bulk.offer(self._held))

    def exposed_expect(self, meta_json: Any) -> str:
        return wire.dumps(self._bulk.expect(wire.loads(meta_json)))

    def exposed_echo_bulk(self, ticket: Any) -> str:
        return wire.dumps(self._bulk.offer(self._bulk.take(ticket)))


class BenchServer:
    """One BenchService connection per client over the same FastChannel as the real server."""

    def __init__(self) -> None:
        self.bulk = sidechannel.BulkServer("127.0.0.1")
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            tune_socket(sock)
            conn = connect_channel(
                FastChannel(FastSocketStream(sock)), service=rpyc.utils.helpers.classpartial(BenchService, self.bulk),
                config=dict(RPYC_CONFIG),
            )
            threading.Thread(target=_serve_quietly, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self._sock.close()
        self.bulk.close()


def _serve_quietly(conn: rpyc.Connection) -> None:
    try:
        conn.serve_all()
    except Exception:  # noqa: BLE001 - the client went away
        pass


def _with_bench(fn: Callable[[rpyc.Connection], list[float]]) -> list[float]:
    server = BenchServer()
    conn = open_connection("127.0.0.1", server.port)
    try:
        return fn(conn)
    finally:
        conn.close()
        server.close()


def rpyc_echo(n: int, repeats: int) -> list[float]:
    """A tensor to the server and back inline, through an exposed call (FastChannel, wire encode/decode)."""
    t = torch.randn(n // 4)

    def once(conn: rpyc.Connection) -> None:
        meta, data = wire.encode_tensor(t)
        meta_json, out = conn.root.echo(wire.dumps(meta), data)
        wire.decode_tensor(wire.loads(meta_json), out)

    return _with_bench(lambda conn: _timed(lambda: once(conn), repeats))


def side_activation(n: int, repeats: int) -> list[float]:
    """One rpyc call returns a ticket, then ``sidechannel.fetch`` (what activation() would do above the threshold)."""

    def run(conn: rpyc.Connection) -> list[float]:
        conn.root.hold(n)
        return _timed(lambda: sidechannel.fetch("127.0.0.1", wire.loads(conn.root.offer_held())), repeats)

    return _with_bench(run)


def side_echo(n: int, repeats: int) -> list[float]:
    """expect → push → take+offer → fetch: a tensor to the server and back through the side channel."""
    t = torch.randn(n // 4)

    def once(conn: rpyc.Connection) -> None:
        slot = wire.loads(conn.root.expect(wire.dumps({"dtype": "float32", "shape": [t.numel()]})))
        sidechannel.push("127.0.0.1", slot, t)
        sidechannel.fetch("127.0.0.1", wire.loads(conn.root.echo_bulk(slot["ticket"])))

    return _with_bench(lambda conn: _timed(lambda: once(conn), repeats))


PATHS: dict[str, Callable[[int, int], list[float]]] = {
    "raw_oneway": raw_oneway,
    "raw_echo": raw_echo,
    "rpyc_activation": rpyc_activation,
    "rpyc_echo": rpyc_echo,
    "side_activation": side_activation,
    "side_echo": side_echo,
}
#: Which raw yardstick each path is compared with.
YARDSTICK = {"rpyc_activation": "raw_oneway", "side_activation": "raw_oneway", "rpyc_echo": "raw_echo", "side_echo": "raw_echo"}
