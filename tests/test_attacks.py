"""Attacks on a real ``djinn-server`` process, each bounded in count and time, on loopback only.

Every test keeps an authenticated client connected from before the attack and checks
that it is served throughout. The "fortress" server runs a tiny model with short
limits (hello deadline, call time, auth failures) and a low descriptor limit.
"""
from __future__ import annotations

import os
import resource
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest
import rpyc
import torch

import djinn_nb
from djinn_nb.client.connection import Client
from djinn_nb.errors import BadRequestError, DjinnError, QuotaError
from djinn_nb import wire
from djinn_nb.wire import sidechannel
from djinn_nb.wire.protocol import PROTOCOL
from djinn_nb.serving.objects import MAX_OBJECTS
from djinn_nb.serving.service import DjinnService
from djinn_nb.wire.transport import RPYC_CONFIG, open_connection
from server_proc import start

PROMPT = [5, 17, 42, 99, 3, 250, 11, 7]
TOKEN = "fortress-token"
NOFILE = 160
OBJECTS_TRIED = 20 * 1024


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@pytest.fixture(scope="module")
def fortress():
    workdir = Path(tempfile.mkdtemp(prefix="djinn-fortress-"))
    server = start(["--model", "random:gpt2-tiny", "--hello-seconds", "1.5", "--max-auth-failures", "5",
                    "--max-call-seconds", "0.4", "--max-call-steps", "200", "--max-unauthenticated", "16",
                    "--max-connections", "100000", "--max-held-bytes", "2000000"], workdir, preexec=_low_nofile,
                   env_extra={"DJINN_TOKEN": TOKEN,  # the token through the environment, not the command line
                              "OMP_NUM_THREADS": "1"})  # a 0.4 s call limit: no thread-pool stalls on a busy box
    yield server
    server.stop()


@pytest.fixture()
def keeper(fortress):
    """An authenticated client connected before the attack; ``check()`` asserts it is still served."""
    client = djinn_nb.connect(fortress.address, token=TOKEN)
    run = client.generate(PROMPT, max_new_tokens=4, breakpoints=[2])
    want = client.generate(PROMPT, max_new_tokens=4).token_ids

    def check() -> None:
        assert fortress.alive()
        fork = run.fork(breakpoints=[])
        assert fork.token_ids == want
        fork.close()

    client.check = check
    yield client
    try:
        check()
    finally:  # a failed test must not leave runs that push the next tests past --max-held-bytes
        for r in client.runs():
            client.attach(r["id"]).close()
        client.close()


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.mark.attack(cls="door", tried="24 silent sockets and a 1-byte trickle before hello", held="all cut off by the 1.5 s hello deadline; a client with a token served throughout")
def test_silent_and_trickling_peers_are_cut_off_at_the_hello_deadline(fortress, keeper):
    socks = [socket.create_connection(("127.0.0.1", fortress.port)) for _ in range(24)]
    trickle = socket.create_connection(("127.0.0.1", fortress.port))
    try:
        t0 = time.monotonic()
        evicted = socks[:9]  # 16 may wait for hello at once: each one past them hangs up the oldest
        assert all(_closed_by_server(s, 3.0) for s in evicted)
        try:
            trickle.sendall(struct.pack("!LB", 60000, 0))
            for _ in range(4):
                trickle.sendall(b"\x00")
                keeper.check()
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass  # on a slow machine the deadline may already have cut it off: what is asserted below
        keeper.check()
        assert all(_closed_by_server(s, 8) for s in socks[9:] + [trickle])
        assert time.monotonic() - t0 < 9  # the deadline is 1.5 s; without the doorman they would stay forever
    finally:
        for s in socks + [trickle]:
            s.close()
    djinn_nb.connect(fortress.address, token=TOKEN).close()  # newcomers are served again


@pytest.mark.attack(cls="door", tried="16 idle sockets fill every hello slot, plus a reconnect loop", held="a client with a token gets in 5 of 5 times (the oldest idle socket is hung up)")
def test_a_client_with_a_token_gets_in_past_a_peer_holding_every_hello_slot(fortress, keeper):
    """A peer's idle sockets (and a loop reconnecting) fill the 16 hello slots; a client with a
    token connecting then is served (it was refused: the door was locked for everyone)."""
    idle = [socket.create_connection(("127.0.0.1", fortress.port)) for _ in range(16)]
    stop = threading.Event()
    churned = [0]

    def churn() -> None:
        while not stop.is_set():
            try:
                socket.create_connection(("127.0.0.1", fortress.port)).close()
                churned[0] += 1
            except OSError:
                pass

    loop = threading.Thread(target=churn, daemon=True)
    loop.start()
    try:
        for _ in range(5):
            client = djinn_nb.connect(fortress.address, token=TOKEN)
            assert client.generate(PROMPT, max_new_tokens=2).done
            client.close()
        keeper.check()
    finally:
        stop.set()
        loop.join(5)
        for s in idle:
            s.close()
    assert churned[0] > 5


@pytest.mark.attack(cls="door", tried="12 garbage or forged frames before hello", held="no traceback logged; at most one short line per address a minute")
def test_unreadable_frames_before_hello_log_one_short_line_per_address(fortress, keeper):
    """A regression guard: whatever a peer sends before hello, the log gets no traceback and at
    most one short line per address a minute."""
    from rpyc.core import brine, consts

    before = fortress.log.read_text()
    request = brine.dump((consts.MSG_REQUEST, 1, (999, 1, ())))
    frames = [os.urandom(200), struct.pack("!LB", 40, 0) + os.urandom(40),
              struct.pack("!LB", len(request), 0) + request] * 4
    socks = [socket.create_connection(("127.0.0.1", fortress.port)) for _ in frames]
    try:
        for s, frame in zip(socks, frames):
            s.sendall(frame)
        assert all(_closed_by_server(s, 5.0) for s in socks)
    finally:
        for s in socks:
            s.close()
    keeper.check()
    new = fortress.log.read_text()[len(before):]
    assert "Traceback" not in new, new[-3000:]
    lines = [line for line in new.splitlines() if "127.0.0.1" in line]
    assert len(lines) <= 1 and all(len(line) < 300 for line in lines), lines


@pytest.mark.attack(cls="wire", tried="a client object passed to each exposed call, in each position", held="every call refused as BadRequestError; the object never touched")
def test_remote_objects_are_refused_without_being_touched(fortress, keeper):
    touched = []

    class Bait:
        def __repr__(self) -> str:
            touched.append("repr")
            return "bait"

        def __str__(self) -> str:
            touched.append("str")
            return "bait"

        def __eq__(self, other: object) -> bool:
            touched.append("eq")
            return False

        __hash__ = object.__hash__

        def __len__(self) -> int:
            touched.append("len")
            return 1

    conn = rpyc.connect("127.0.0.1", fortress.port, config=dict(RPYC_CONFIG, allow_all_attrs=True))
    try:
        assert wire.loads(conn.root.hello(PROTOCOL, TOKEN))["ok"]
        calls = sorted(n.removeprefix("exposed_") for n in dir(DjinnService)
                       if n.startswith("exposed_") and getattr(getattr(DjinnService, n), "djinn_call", False))
        assert len(calls) >= 20
        for name in ("get_service_name", "get_service_aliases"):  # rpyc's own exposed methods are not served
            with pytest.raises(AttributeError):
                getattr(conn.root, name)
        for name in calls:
            for position in range(2):
                args = ["x"] * position + [Bait()]
                msg = wire.loads(getattr(conn.root, name)(*args))
                assert msg["ok"] is False and msg["error"]["kind"] == "BadRequestError", (name, msg)
                assert "plain value" in msg["error"]["message"] or "takes" in msg["error"]["message"]
        assert touched == []
    finally:
        conn.close()


@pytest.mark.attack(cls="door", tried="20 silent sockets and a trickle on the side channel", held="a 1.2 MB upload goes through meanwhile; all cut off at the ticket deadline")
def test_side_channel_silent_and_trickling_peers_block_nobody(fortress, keeper):
    slot = keeper._call("expect", wire.dumps({"dtype": "float32", "shape": [4]}))
    port = slot["port"]
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    trickle = socket.create_connection(("127.0.0.1", port))
    t0 = time.monotonic()
    big = torch.arange(300_000, dtype=torch.float32)  # 1.2 MB, uploaded while they hang on
    up = keeper._call("expect", wire.dumps({"dtype": "float32", "shape": [300_000]}))
    sidechannel.push("127.0.0.1", up, big)
    assert time.monotonic() - t0 < 3
    for _ in range(3):
        trickle.sendall(b"\x01")
        time.sleep(0.5)
    assert all(_closed_by_server(s, sidechannel.TICKET_SECONDS + 2) for s in silent + [trickle])
    assert time.monotonic() - t0 < sidechannel.TICKET_SECONDS + 3
    for s in silent + [trickle]:
        s.close()


SLOT = wire.dumps({"dtype": "float32", "shape": [100_000]})  # 0.4 MB: four fit the fortress's 2 MB, five do not


@pytest.mark.attack(cls="counting", tried="side-channel reservations left behind by 3 closed connections", held="released with their connection; a fifth 0.4 MB slot over 2 MB refused")
def test_reserved_side_channel_slots_are_released_when_their_connection_ends(fortress, keeper):
    for _ in range(3):  # would be refused the second time if the first reservations had been kept
        conn = open_connection("127.0.0.1", fortress.port)
        assert wire.loads(conn.root.hello(PROTOCOL, TOKEN))["ok"]
        for _ in range(4):
            reply = wire.loads(conn.root.expect(SLOT))
            assert reply["ok"], reply
        conn.close()
        time.sleep(0.2)
    conn = open_connection("127.0.0.1", fortress.port)
    try:
        assert wire.loads(conn.root.hello(PROTOCOL, TOKEN))["ok"]
        assert all(wire.loads(conn.root.expect(SLOT))["ok"] for _ in range(4))
        fifth = wire.loads(conn.root.expect(SLOT))  # reservations count to the user's bytes, like runs
        assert fifth["error"]["kind"] == "QuotaError" and "max_held_bytes" in fifth["error"]["message"]
    finally:
        conn.close()


@pytest.mark.attack(cls="counting", tried="an upload that breaks off", held="its slot is freed; four fit again")
def test_a_broken_upload_frees_its_slot(fortress, keeper):
    up = keeper._call("expect", SLOT)
    with pytest.raises(DjinnError, match="upload failed"):
        sidechannel.push("127.0.0.1", up, torch.zeros(4), timeout=5)  # too short: the server drops the slot
    time.sleep(0.2)
    tickets = [keeper._call("expect", SLOT)["ticket"] for _ in range(4)]  # all four fit again
    assert up["ticket"] not in tickets


@pytest.mark.attack(cls="admission", tried="a 201-step call against a 200-step cap", held="refused with nothing made")
def test_call_caps_stop_a_long_call_and_refuse_a_huge_one(fortress, keeper):
    before = len(keeper.runs())
    with pytest.raises(QuotaError, match="max_call_steps"):
        keeper.generate(PROMPT, max_new_tokens=201)
    assert len(keeper.runs()) == before  # nothing was made


@pytest.fixture(scope="module")
def hurried():
    """A server whose calls may run 0.05 s: a 200-step call recording every site of every
    block takes ~1 s on the 2-core test machine, so it is stopped on any machine up to ~20x faster."""
    workdir = Path(tempfile.mkdtemp(prefix="djinn-hurried-"))
    server = start(["--model", "random:gpt2-tiny", "--max-call-seconds", "0.05", "--max-call-steps", "200"],
                   workdir, env_extra={"DJINN_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"})
    yield server
    server.stop()


@pytest.mark.attack(cls="admission", tried="a call recording every site of every block past a 0.05 s call limit", held="stopped within 3 s, its run closed, the server serves on")
def test_a_call_past_max_call_seconds_is_stopped_and_its_run_closed(hurried):
    client = djinn_nb.connect(hurried.address, token=TOKEN)
    try:
        every_site = [{"layer": layer, "step": "all", "site": site} for layer in range(12) for site in client.info["sites"]]
        t0 = time.monotonic()
        with pytest.raises(QuotaError, match=r"stopped at step \d+: the call ran past the server's max_call_seconds"):
            client.generate(PROMPT, max_new_tokens=200, watches=every_site)
        assert time.monotonic() - t0 < 3
        assert client.runs() == []  # the stopped run was closed
        assert client.generate(PROMPT, max_new_tokens=1).token_ids[-1:]  # and the server serves on
    finally:
        for r in client.runs():
            client.attach(r["id"]).close()
        client.close()


@pytest.mark.attack(cls="admission", tried="a run with watches needing ~2.3 MB under a 2 MB cap", held="refused before allocating; the run list unchanged")
def test_what_runs_hold_is_bounded_with_a_clear_refusal(fortress, keeper):
    before = sorted(r["id"] for r in keeper.runs())
    with pytest.raises(QuotaError, match="max_held_bytes"):  # ~2.3 MB of cache and watches, over the 2 MB cap
        keeper.generate([i % 500 for i in range(250)], max_new_tokens=2, breakpoints=[11],
                        watches=[(layer, 0) for layer in range(11)])
    assert sorted(r["id"] for r in keeper.runs()) == before


@pytest.mark.attack(cls="door", tried="180 connections against 160 descriptors", held="newcomers refused, the connected client served, newcomers served again after")
def test_running_out_of_descriptors_refuses_newcomers_and_keeps_serving(fortress, keeper):
    conns, refused = [], 0
    try:
        for _ in range(NOFILE + 20):
            try:
                conns.append(Client("127.0.0.1", fortress.port, TOKEN))
            except DjinnError:
                refused += 1
                if refused >= 5:
                    break
        assert refused >= 5 and len(conns) < NOFILE
        keeper.check()
    finally:
        for c in conns:
            c.close()
    time.sleep(0.5)
    djinn_nb.connect(fortress.address, token=TOKEN).close()


@pytest.mark.attack(cls="wire", tried="a fake server announcing a 4 GiB frame and a 1 TiB tensor", held="the client hangs up within 2 s without allocating")
def test_client_does_not_trust_sizes_the_server_announces():
    """A fake server announcing a 4 GiB frame: the client hangs up without allocating it."""
    listener = socket.create_server(("127.0.0.1", 0))

    def liar() -> None:
        sock, _ = listener.accept()
        sock.recv(65536)
        sock.sendall(struct.pack("!LB", 0xFFFFFF00, 0))
        time.sleep(2)
        sock.close()

    threading.Thread(target=liar, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(DjinnError, match="closed the connection|lost"):
        Client("127.0.0.1", listener.getsockname()[1], max_download_bytes=1 << 20)
    assert time.monotonic() - t0 < 2
    listener.close()
    with pytest.raises(BadRequestError, match="over"):
        sidechannel.fetch("127.0.0.1", {"dtype": "float32", "shape": [1 << 38], "port": 1, "ticket": "00" * 32},
                          max_bytes=1 << 30)


@pytest.mark.attack(cls="door", tried="12 wrong tokens from loopback", held="throttled after 5, one log line; a correct token still admitted")
def test_failed_authentications_are_throttled_and_logged_once(fortress, keeper):
    """Last in this module: it throttles loopback's wrong hellos for a minute. A correct token is
    still admitted then (on an SSH tunnel every user is 127.0.0.1: a lockout would be everyone's)."""
    kinds = []
    for i in range(12):
        conn = open_connection("127.0.0.1", fortress.port)
        try:
            kinds.append(wire.loads(conn.root.hello(PROTOCOL, f"guess-{i}"))["error"]["message"])
        finally:
            conn.close()
    assert all("wrong or missing token" in m for m in kinds[:5])
    assert all("too many failed" in m for m in kinds[5:])
    conn = open_connection("127.0.0.1", fortress.port)
    try:
        assert wire.loads(conn.root.hello(PROTOCOL, TOKEN))["ok"]
    finally:
        conn.close()
    djinn_nb.connect(fortress.address, token=TOKEN).close()
    keeper.check()
    log = fortress.log.read_text()
    assert log.count("failed authentication") == 1, log[-2000:]
    assert "accepted" not in log and "welcome" not in log and "goodbye" not in log


# ----- on the shared server ----------------------------------------------------------------------
@pytest.mark.attack(cls="counting", tried="32 clients fetching a 1.2 MB activation at once", held="all 32 equal the original")
def test_32_clients_fetching_large_tensors_at_once_all_succeed(lab):
    owner = lab.connect("bob")
    run = owner.generate([(7 * i) % 500 for i in range(600)], max_new_tokens=2, breakpoints=[1])
    want = run.activation()
    clients = [lab.connect("bob") for _ in range(32)]
    start, out = threading.Barrier(32), {}

    def fetch(i: int) -> None:
        try:
            start.wait(30)
            out[i] = clients[i].attach(run.id).activation()
        except BaseException as e:  # noqa: BLE001 - reported below
            out[i] = e

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(32)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        errors = {i: r for i, r in out.items() if isinstance(r, BaseException)}
        assert not errors, errors
        assert len(out) == 32 and all(torch.equal(out[i], want) for i in range(32))
        assert want.numel() * want.element_size() > 1 << 20
    finally:
        for c in clients:
            c.close()
        run.close()
        owner.close()


@pytest.mark.attack(cls="counting", tried="12 runs holding > 120 MB, then closed", held="the server's RSS returns within 15 % of what they held")
def test_memory_of_closed_runs_goes_back_to_the_os(lab):
    bob = lab.connect("bob")
    try:
        prompt = [(11 * i) % 500 for i in range(600)]
        bob.generate(prompt, max_new_tokens=2, breakpoints=[3]).close()  # warm up allocator and caches
        time.sleep(1)
        baseline = lab.rss()
        runs = [bob.generate(prompt, max_new_tokens=2, breakpoints=[3], watches=[(0, 0), (1, 0), (2, 0)])
                for _ in range(12)]
        held = sum(r.refresh().bytes_held for r in runs)
        grown = lab.rss() - baseline
        assert held > 120e6 and grown > 0.6 * held, (held, grown)
        for r in runs:
            r.close()
        deadline, now = time.monotonic() + 10, lab.rss()
        while now - baseline > 0.15 * held and time.monotonic() < deadline:
            time.sleep(0.2)
            now = lab.rss()
        assert now - baseline <= 0.15 * held, (baseline, now, held)
    finally:
        bob.close()


@pytest.mark.attack(cls="admission", tried="a peer stalling halfway through a 1 MiB frame", held="another large request waits 0.5 s then its connection drops; room back once the staller leaves")
def test_large_inline_requests_share_a_bounded_in_flight_budget():
    """An authenticated peer stalls halfway through a 1 MiB frame (its bytes reserved) in a 1.5 MiB
    budget: another 1 MiB request waits, then its connection is dropped; once the staller is gone,
    room is back."""
    from djinn_nb.serving.server import Limits
    from serving import raw_connection, reply, serve

    served = serve(limits=Limits(inflight_bytes=3 << 19, inflight_wait_s=0.5))
    blob, header = b"\0" * (1 << 20), wire.dumps({"activation": {"dtype": "float32", "shape": [1 << 18]}})
    try:
        staller, b = raw_connection(served.port), raw_connection(served.port)
        run = reply(b.root.generate(wire.dumps({"prompt": PROMPT, "max_new_tokens": 2, "breakpoints": [3]})))["result"]
        sock = staller._channel.stream.sock
        sock.sendall(struct.pack("!LB", (1 << 20) + 200, 0) + b"\0" * 1000)  # then nothing
        time.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises(EOFError):
            b.root.edit(run["id"], header, blob, None)
        assert time.monotonic() - t0 < 3
        sock.shutdown(socket.SHUT_RDWR)
        staller.close()
        time.sleep(0.2)
        c = raw_connection(served.port)
        assert reply(c.root.edit(run["id"], header, blob, None))["error"]["kind"] == "ActivationError"  # reached the call
        c.close()
    finally:
        served.server.close()


@pytest.mark.attack(cls="door", tried="60 stalled TLS handshakes against 4 hello slots", held="at most 4 held open; a client with a token and the CA gets in")
def test_stalled_tls_handshakes_count_against_the_hello_slots():
    """Sockets that never finish a TLS handshake hold a hello slot from accept: 60 of them against
    4 slots keep at most 4 open on the server (they escaped the cap, each holding a descriptor and
    a thread), and a client with a token and the CA still gets in."""
    from server_proc import make_cert

    workdir = Path(tempfile.mkdtemp(prefix="djinn-tls-door-"))
    cert, key = make_cert(workdir, "server")
    server = start(["--model", "random:gpt2-tiny", "--tls-cert", cert, "--tls-key", key, "--max-unauthenticated", "4",
                    "--hello-seconds", "30"], workdir, env_extra={"DJINN_TOKEN": TOKEN})

    def sockets_open() -> int:
        n = 0
        for fd in os.listdir(f"/proc/{server.proc.pid}/fd"):
            try:
                n += os.readlink(f"/proc/{server.proc.pid}/fd/{fd}").startswith("socket:")
            except OSError:  # closed while listed
                pass
        return n

    try:
        djinn_nb.connect(server.address, token=TOKEN, tls_ca=cert).close()
        time.sleep(0.3)
        base = sockets_open()
        stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(60)]
        try:
            deadline = time.monotonic() + 3  # the evicted ones close as their threads notice (a handshake stalls 10 s)
            while sockets_open() - base > 4 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert sockets_open() - base <= 4, (base, sockets_open())
            client = djinn_nb.connect(server.address, token=TOKEN, tls_ca=cert)
            assert client.generate(PROMPT, max_new_tokens=2).done
            client.close()
        finally:
            for s in stalled:
                s.close()
    finally:
        server.stop()


@pytest.mark.attack(cls="wire", tried="20,480 call lookups never released (server memory growth)", held="that connection ends past 1,024 objects; 3,000 honest calls are never cut off")
def test_a_peer_that_never_releases_what_it_looks_up_is_cut_off_alone(fortress, keeper):
    """Each ``conn.root.<call>`` lookup makes the server hold a bound method until the peer
    releases it; a peer that never does is disconnected past the bound, nobody else is, and an
    honest client looking up thousands of calls (and releasing them) is never cut off."""
    honest = djinn_nb.connect(fortress.address, token=TOKEN)
    for _ in range(3000):
        honest._call("runs")
    honest.close()
    conn = rpyc.connect("127.0.0.1", fortress.port, config=RPYC_CONFIG)
    held = []
    try:
        assert wire.loads(conn.root.hello(PROTOCOL, TOKEN))["ok"]
        with pytest.raises(EOFError):
            for _ in range(OBJECTS_TRIED):
                held.append(conn.root.runs)  # kept: never released
        assert len(held) < MAX_OBJECTS + 2
    finally:
        held.clear()
        conn.close()
    keeper.check()
