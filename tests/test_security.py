"""Authentication, isolation between tokens, the locked-down rpyc config, and clients that vanish."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import pytest
import rpyc
from rpyc.core import consts

import djinn_nb
from djinn_nb.wire.messages import RunSummary
from djinn_nb.wire.protocol import PROTOCOL
from djinn_nb import wire
from djinn_nb.errors import AuthenticationError, UnknownRunError
from djinn_nb.serving.server import DjinnServer
from serving import NEW_TOKENS, PROMPT, raw_connection, reply, serve, where

TOKEN = "s3cret-token-A"


@pytest.fixture(scope="module")
def guarded():
    """A token-guarded server with one run paused at (3, 0), made by a client holding the token."""
    served = serve(token=TOKEN)
    client = djinn_nb.connect(f"127.0.0.1:{served.port}", token=TOKEN)
    run = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, breakpoints=[3])
    yield served, client, run
    client.close()
    served.server.close()


@pytest.mark.parametrize("token", ["wrong", None, "", TOKEN + " "])
@pytest.mark.attack(cls="isolation", tried="a wrong or missing token", held="refused at hello")
def test_wrong_or_missing_token_is_refused_at_hello(guarded, token):
    served, _, _ = guarded
    env = dict(os.environ)
    os.environ.pop("DJINN_TOKEN", None)
    try:
        with pytest.raises(AuthenticationError, match="token"):
            djinn_nb.connect(f"127.0.0.1:{served.port}", token=token)
    finally:
        os.environ.clear()
        os.environ.update(env)


@pytest.mark.parametrize("call,args", [("runs", ()), ("status", ("r1",)), ("activation", ("r1",)),
                                       ("resume", ("r1", "{}")), ("close", ("r1",)), ("info", ())])
@pytest.mark.attack(cls="isolation", tried="every call after a failed hello", held="refused")
def test_a_connection_that_failed_hello_can_do_nothing(guarded, call, args):
    served, client, run = guarded
    conn = raw_connection(served.port, "wrong", hello=False)
    try:
        assert reply(conn.root.hello(PROTOCOL, "wrong"))["error"]["kind"] == "AuthenticationError"
        with pytest.raises(AttributeError, match="hello"):  # nothing but hello can even be looked up
            getattr(conn.root, call)(*[run.id if a == "r1" else a for a in args])
    finally:
        conn.close()
    assert run.refresh().paused and (run.layer, run.step) == (3, 0)


@pytest.mark.attack(cls="isolation", tried="another token listing, reading, editing, forking, closing these runs", held="sees and touches none of them")
def test_another_token_sees_and_touches_none_of_these_runs(guarded):
    """A second server over the same engine with token B: B's client is a different owner."""
    served, client, run = guarded
    other = DjinnServer(served.engine, "127.0.0.1", 0, token="token-B").start()
    try:
        b = djinn_nb.connect(f"127.0.0.1:{other.port}", token="token-B")
        assert b.runs() == [] and [r["id"] for r in client.runs()] == [run.id]
        handle = djinn_nb.client.Run(b, RunSummary(id=run.id, state="paused", step=0, layer=6, site="resid_post",
                                                   token_ids=[], prompt_ids=[1], max_new_tokens=1))
        for attempt in (lambda: b.attach(run.id), handle.activation, handle.resume, lambda: handle.fork(scale=2.0), handle.close):
            with pytest.raises(UnknownRunError):
                attempt()
        b.close()
    finally:
        other.close()
    assert run.refresh().paused and (run.layer, run.step) == (3, 0)
    assert run.run_to_end().token_ids == served.reference


def test_non_loopback_bind_needs_a_token():
    with pytest.raises(AuthenticationError, match="DJINN_TOKEN"):
        DjinnServer(object(), "0.0.0.0", 0)  # refused before the engine is looked at


@pytest.mark.attack(cls="defaults", tried="binding beyond loopback with no token", held="the server refuses to start")
def test_server_cli_refuses_non_loopback_without_a_token():
    env = {k: v for k, v in os.environ.items() if k != "DJINN_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "djinn_nb.serving", "--host", "0.0.0.0", "--model", "random:gpt2-tiny"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--token" in proc.stderr and "DJINN_TOKEN" in proc.stderr


# ----- nothing but the exposed calls -------------------------------------------------------------
REACHES = {
    "private attribute": lambda root: root._state,
    "engine property": lambda root: root._engine,
    "owner": lambda root: root._owner,
    "method globals": lambda root: root.exposed_hello.__globals__,
    "method code": lambda root: root.hello.__code__,
    "bound self": lambda root: root.hello.__self__,
    "class dict": lambda root: root.__dict__["_state"],
    "getattr of a mangled name": lambda root: getattr(root, "_DjinnService__state"),  # noqa: B009 - the attack's own spelling
    "setattr": lambda root: setattr(root, "exposed_hello", None),
    "delattr": lambda root: delattr(root, "exposed_status"),
}


@pytest.mark.parametrize("name", sorted(REACHES))
@pytest.mark.attack(cls="wire", tried="rpyc's private and dunder names", held="unreachable")
def test_nothing_but_exposed_calls_is_reachable(guarded, name):
    served, client, run = guarded
    conn = raw_connection(served.port, TOKEN)
    try:
        with pytest.raises((AttributeError, TypeError, KeyError)):
            REACHES[name](conn.root)
        assert reply(conn.root.runs())["ok"]  # the connection still serves
    finally:
        conn.close()


@pytest.mark.attack(cls="wire", tried="pickle and rpyc classic requests", held="refused")
def test_pickle_and_classic_requests_are_refused(guarded):
    served, _, _ = guarded
    conn = raw_connection(served.port, TOKEN)
    try:
        with pytest.raises(ValueError, match="pickl"):
            conn.sync_request(consts.HANDLE_PICKLE, conn.root, 2)
        with pytest.raises(AttributeError):
            conn.sync_request(consts.HANDLE_GETATTR, conn.root, "_state")
        with pytest.raises(AttributeError):
            conn.root.getmodule("os")  # SlaveService (classic mode) is not served
        with pytest.raises(AttributeError):
            conn.root.eval("1")
    finally:
        conn.close()


# ----- clients that vanish -------------------------------------------------------------------------
def _kill(conn: rpyc.Connection) -> None:
    """Drop the socket under the connection, as a dying kernel would."""
    sock = conn._channel.stream.sock
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _serves_others(port: int, reference: list[int]) -> None:
    client = djinn_nb.connect(f"127.0.0.1:{port}")
    try:
        run = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, breakpoints=[2])
        assert run.paused and run.run_to_end().token_ids == reference
    finally:
        client.close()


@pytest.fixture()
def open_server():
    served = serve()
    yield served
    served.server.close()


@pytest.mark.attack(cls="wire", tried="a client killed while its run is paused", held="the server serves on")
def test_client_killed_while_paused_leaves_the_server_serving(open_server):
    conn = raw_connection(open_server.port)
    run = reply(conn.root.generate(wire.dumps({"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "breakpoints": [4]})))["result"]
    _kill(conn)
    _serves_others(open_server.port, open_server.reference)
    survivor = raw_connection(open_server.port)
    try:
        assert where(survivor, run["id"])[:3] == ("paused", 4, 0)  # kept for its lease, not lost
    finally:
        survivor.close()


def test_client_killed_mid_call_leaves_the_server_serving(open_server):
    conn = raw_connection(open_server.port)
    rpyc.async_(conn.root.generate)(wire.dumps({"prompt": PROMPT, "max_new_tokens": 200}))  # request sent, reply never read
    _kill(conn)
    _serves_others(open_server.port, open_server.reference)


@pytest.mark.attack(cls="wire", tried="a half-sent frame, then a disconnect", held="the server serves on")
def test_half_sent_frame_then_disconnect_leaves_the_server_serving(open_server):
    sock = socket.create_connection(("127.0.0.1", open_server.port))
    sock.sendall(struct.pack("!LB", 1 << 20, 0) + b"\x00" * 10)
    sock.close()
    time.sleep(0.05)
    _serves_others(open_server.port, open_server.reference)


@pytest.mark.attack(cls="door", tried="an oversize frame before hello", held="dropped unread")
def test_oversize_frame_before_hello_is_dropped_unread(open_server):
    """A peer that claims a huge frame before authenticating gets disconnected, no buffer allocated."""
    sock = socket.create_connection(("127.0.0.1", open_server.port))
    sock.settimeout(5)
    sock.sendall(struct.pack("!LB", 256 << 20, 0))
    while sock.recv(4096):  # whatever rpyc sent at connect, then end of stream: the server hung up
        pass
    sock.close()
    _serves_others(open_server.port, open_server.reference)


def test_authenticated_frames_may_be_large(open_server):
    """After hello the cap rises to the payload cap: a 2 MB inline tensor is accepted."""
    conn = raw_connection(open_server.port)
    try:
        run = reply(conn.root.generate(wire.dumps({"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "breakpoints": [4]})))["result"]
        blob = b"\x00" * (2 << 20)
        msg = reply(conn.root.edit(run["id"], wire.dumps({"activation": {"dtype": "float32", "shape": [len(blob) // 4]}}), blob, None))
        assert msg["error"]["kind"] == "ActivationError"  # reached validation: wrong shape, not a dropped link
        assert where(conn, run["id"])[:3] == ("paused", 4, 0)
    finally:
        conn.close()
