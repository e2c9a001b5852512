"""``djinn-server local``: the per-user background server ``connect()`` starts, and ``status``/``stop``.

Why a process and not a server inside the notebook's kernel: the local path is then the remote
path (one code path to test and to make fast); kernel and server stop sharing a GIL and CPU
threads; a kernel restart finds its paused runs where it left them (``client.runs()``); and every
connect after the first is a connect (a tenth of a second), not an import of torch and
transformers and a model load (seconds).

The server binds 127.0.0.1 only, authenticates with the token its starter wrote to a 0600 file in
the private directory (``localhome.py``), has the limits of a notebook's own server (generous,
never unbounded: ``limits.py``), and never expires a run unless started with a lease. It exits by
itself after ``--idle-seconds`` (default ``localhome.IDLE_SECONDS``, 30 minutes, or
``$DJINN_LOCAL_IDLE_SECONDS``) with no client connected and no paused run (finished runs do not
keep it: a notebook seldom closes them), and after ``localhome.ORPHAN_SECONDS`` (a day) with no
client even if it keeps paused runs. It detaches from its starter
(a fork and a new session) so a kernel's Ctrl-C or exit does not reach it.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from ..errors import DjinnError
from ..version import __version__
from . import localhome
from .lease import check_lease

log = logging.getLogger("djinn_nb.serving.local")

LEASE_HINT = "the local server was started without a lease: connect(lease_seconds=...) on a fresh start sets one"


def _seconds(text: str) -> float | None:
    if text.strip().lower() in ("none", "never"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"a number of seconds > 0, or 'none', not {text!r}")
    return value


def _detach(log_path: str) -> bool:
    """Fork: the parent prints the child's pid and returns True (it exits); the child starts a new
    session, writes to the log and returns False (it serves)."""
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        return True
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
    return False


def local_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="djinn-server local",
                                description="The per-user local server (connect() starts it; not for direct use).")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--nonce", default="", help="the starter's mark, written to the state file")
    p.add_argument("--idle-seconds", type=_seconds, default=None,
                   help=f"exit after this long with no client and no paused run (default $DJINN_LOCAL_IDLE_SECONDS, "
                        f"else {localhome.IDLE_SECONDS:g})")
    p.add_argument("--lease-seconds", type=_seconds, default=None, help="close runs untouched this long (default never)")
    p.add_argument("--foreground", action="store_true", help="do not detach")
    args = p.parse_args(argv)
    files = localhome.Files.of(localhome.key(args.model, args.device, args.dtype))
    if not args.foreground and _detach(str(files.log)):
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        idle = args.idle_seconds if args.idle_seconds is not None else localhome.idle_seconds()
        check_lease(args.lease_seconds)
        token = localhome.read_token(files.token)
        if token is None:
            raise DjinnError(f"no token in {files.token}: connect() writes it before it starts the server")
        server = _serve(args.model, args.device, args.dtype, token, args.lease_seconds)
    except DjinnError as e:
        print(f"djinn-server local: {e}", file=sys.stderr, flush=True)
        return 2
    state: dict[str, Any] = {"pid": os.getpid(), "port": server.port, "model": args.model or "embedded",
                             "device": args.device, "dtype": args.dtype, "nonce": args.nonce, "started": time.time(),
                             "idle_seconds": idle, "lease_seconds": args.lease_seconds, "version": __version__}
    info = server.state.engine.info()
    print(f"djinn-server local: {info['model']} ({info['num_layers']} layers) on {info['device']} at "
          f"{server.address}; exits after {idle:g} s with no client and no paused run", flush=True)
    try:
        _watch(server, files, state, idle)
    finally:
        server.close()
        localhome.remove(files, pid=os.getpid())
    return 0


def _serve(model: str | None, device: str, dtype: str | None, token: str, lease: float | None) -> Any:
    from ..core.gcpause import paused_gc

    with paused_gc():
        from .limits import derive_limits
        from .server import DjinnServer, build_engine

        engine = build_engine(model, device, dtype)
        limits = derive_limits({}, device=engine.device, max_positions=engine.max_positions, users=1, embedded=True)
        return DjinnServer(engine, "127.0.0.1", 0, token, lease_seconds=lease, lease_hint=LEASE_HINT,
                           limits=limits).start()


def _watch(server: Any, files: localhome.Files, state: dict[str, Any], idle: float) -> None:
    """Keep the state file current (clients, runs) until idle, orphaned or told to stop."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stop.set())
    now = time.monotonic()
    idle_since: float | None = now
    lonely_since: float | None = now
    shown: tuple[int, int, int] | None = None
    while True:
        runs = server.state.engine.all_runs()
        clients, paused = server.open_connections(), sum(1 for r in runs if r.paused)
        now = time.monotonic()
        lonely_since = (lonely_since or now) if clients == 0 else None
        idle_since = (idle_since or now) if clients == 0 and paused == 0 else None
        if (clients, len(runs), paused) != shown:
            shown = (clients, len(runs), paused)
            state.update(clients=clients, runs=len(runs), paused=paused,
                         idle_since=None if idle_since is None else time.time() - (now - idle_since))
            localhome.write_private(files.state, _json(state))
        if idle_since is not None and now - idle_since >= idle:
            print(f"djinn-server local: no client and no paused run for {idle:g} s: exiting", flush=True)
            return
        if lonely_since is not None and now - lonely_since >= localhome.ORPHAN_SECONDS:
            print(f"djinn-server local: no client for {localhome.ORPHAN_SECONDS:g} s: exiting with {paused} paused runs",
                  flush=True)
            return
        if stop.wait(min(1.0, idle / 4)):
            print("djinn-server local: stopped", flush=True)
            return


def _json(state: dict[str, Any]) -> str:
    import json

    return json.dumps(state)


def status_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="djinn-server status", description="The local servers connect() started.")
    p.parse_args(argv)
    found = localhome.servers()
    if not found:
        print(f"no local djinn server ({localhome.home()})")
        return 1
    for files, state in found:
        pid = state.get("pid")
        alive = type(pid) is int and localhome.pid_alive(pid) and localhome.is_local_server(pid)
        up = time.time() - float(state.get("started") or time.time())
        idle = state.get("idle_since")
        busy = (f"{state.get('clients', 0)} clients, {state.get('runs', 0)} runs ({state.get('paused', 0)} paused)"
                + (f", idle {time.time() - idle:.0f}/{state.get('idle_seconds', 0):g} s" if idle else ""))
        print(f"{state.get('model')} on {state.get('device')}{' ' + state['dtype'] if state.get('dtype') else ''}: "
              + (f"pid {pid} at 127.0.0.1:{state.get('port')}, up {up:.0f} s, {busy}" if alive else
                 f"not running (stale state, pid {pid})")
              + f"; log {files.log}")
    return 0


def stop_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="djinn-server stop", description="Stop the local servers connect() started.")
    p.add_argument("--model", default=None, help="only the server of this model (default: every local server)")
    args = p.parse_args(argv)
    stopped = 0
    for files, state in localhome.servers():
        if args.model is not None and state.get("model") != args.model:
            continue
        if localhome.stop(files, state):
            stopped += 1
            print(f"stopped {state.get('model')} (pid {state.get('pid')})")
    if not stopped:
        print("no local djinn server was running")
    return 0
