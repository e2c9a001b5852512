"""``connect()`` with no address: find, or start, the per-user local server and connect to it.

Why: see ``serving/localserver.py`` (the local path is the remote path; kernel and server do not
share a GIL; a kernel restart re-attaches; a connect after the first takes a tenth of a second).
This module reads the state and token files (``serving/localhome.py``) and never imports torch:
with the server running, ``import djinn_nb; djinn_nb.connect()`` imports rpyc and the client only.

Finding a server: its state file names a pid and a port; the token hello decides. A dead pid, or a
port where the hello fails (someone else listens there now, or an old server with another token),
is stale: the state is replaced by a new server. Starting one holds an ``flock`` on its lock file,
so two first connects at once start one server; the second waits and connects to it.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

from ..errors import AuthenticationError, BadRequestError, DjinnError, ProtocolError
from ..serving import localhome

if TYPE_CHECKING:
    from .connection import Client

#: ``(port, token) -> Client``: how ``connect`` opens a connection (passed in: no import cycle).
Opener = Callable[[int, str], "Client"]

__all__ = ["connect_local"]


def connect_local(model: str | None, device: str, dtype: str | None, lease_seconds: float | None,
                  lease_given: bool, open_client: Opener) -> Client:
    """A client of the local server for (model, device, dtype), started if none answers."""
    files = localhome.Files.of(localhome.key(model, device, dtype))
    client, state = _reach(files, open_client)
    if client is None:
        with localhome.locked(files.lock):
            client, state = _reach(files, open_client)  # another process may have started it meanwhile
            if client is None:
                _start(files, model, device, dtype, lease_seconds)
                client, state = _reach(files, open_client, must=True)
    assert client is not None
    if lease_given and state.get("lease_seconds") != lease_seconds:
        have = state.get("lease_seconds")
        client.close()
        raise BadRequestError(f"the local server of {model or 'embedded'} runs with lease_seconds={have!r}: "
                              "`djinn-server stop` it first to start one with another lease")
    return client


def _reach(files: localhome.Files, open_client: Opener, must: bool = False) -> tuple[Client | None, dict[str, Any]]:
    """A client of the server the state file names and its state, or None if none answers."""
    state = localhome.read_json(files.state)
    token = localhome.read_token(files.token)
    pid, port = (state or {}).get("pid"), (state or {}).get("port")
    if (state is None or token is None or type(port) is not int or type(pid) is not int
            or not localhome.is_local_server(pid)):
        if must:
            raise DjinnError(f"the local server did not leave a state file ({files.state})")
        return None, {}  # none, or a dead (or recycled) pid: stale, to be replaced
    if localhome.listens_on(pid, port) is False:
        if must:
            raise DjinnError(f"the local server (pid {pid}) does not listen on 127.0.0.1:{port}")
        return None, {}  # the port is someone else's now: the token is not sent there
    try:
        client = open_client(port, token)
    except ProtocolError as e:  # alive and ours, but another djinn_nb: never orphan it and its paused runs
        raise ProtocolError(f"the local server (pid {pid}, 127.0.0.1:{port}) runs another djinn_nb version ({e}); "
                            "`djinn-server stop` ends it and its paused runs, then connect again"[:500]) from None
    except (OSError, AuthenticationError, DjinnError) as e:
        if must or not isinstance(e, AuthenticationError):
            # alive, ours, on its port: a slow or dropped hello must not orphan it (and its paused runs)
            raise DjinnError(f"the local server (pid {pid}) at 127.0.0.1:{port} did not answer: {e}; try again, or "
                             "`djinn-server stop` it"[:500]) from None
        return None, {}  # a token that is not its: a stale token file
    return client, state


def _start(files: localhome.Files, model: str | None, device: str, dtype: str | None,
           lease_seconds: float | None) -> None:
    """Start a server (the lock is held): a fresh token, then ``djinn-server local``, which detaches;
    wait until it has written its state file with this start's nonce."""
    localhome.remove(files)  # any stale state and token
    localhome.write_private(files.token, secrets.token_urlsafe(32))
    nonce = secrets.token_hex(8)
    if model is not None and os.path.isdir(model):
        model = os.path.abspath(model)  # the server's name for it (localhome.key) and its state's
    argv = [sys.executable, "-m", "djinn_nb.serving", "local", "--device", device, "--nonce", nonce]
    for flag, value in (("--model", model), ("--dtype", dtype), ("--lease-seconds", lease_seconds)):
        if value is not None:
            argv += [flag, str(value)]
    env = {k: v for k, v in os.environ.items() if k != "DJINN_TOKEN"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [_package_root(), env.get("PYTHONPATH", "")] if p)
    start = os.path.getsize(files.log) if files.log.exists() else 0
    with open(files.log, "a") as log:
        os.chmod(files.log, 0o600)
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env,
                             text=True, timeout=localhome.START_SECONDS)
    pid = int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip().isdigit() else None
    deadline = time.monotonic() + localhome.START_SECONDS
    while pid is not None and time.monotonic() < deadline:
        state = localhome.read_json(files.state)
        if state is not None and state.get("nonce") == nonce:
            return
        if not localhome.pid_alive(pid):
            break
        time.sleep(0.05)
    else:
        if pid is not None:  # timed out
            os.kill(pid, 15)
    raise DjinnError(f"the local djinn server for {model or 'embedded'} did not start; its log "
                     f"({files.log}) says:\n{_tail(files.log, start)}")


def _tail(path: Any, start: int, n: int = 3000) -> str:
    try:
        with open(path) as f:
            f.seek(start)
            return f.read()[-n:]
    except OSError:
        return "(no log)"


def _package_root() -> str:
    """The directory holding the ``djinn_nb`` package this process imported: the server runs the same code."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
