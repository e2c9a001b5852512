"""Where the per-user local server keeps its files, and how both ends read them. Standard library only.

``connect()`` with no address reaches a background ``djinn-server`` on loopback (see
``localserver.py`` and ``client/local.py``). Both sides, and ``djinn-server status``/``stop``,
find it through one private directory: ``$DJINN_HOME``, else ``$XDG_CACHE_HOME/djinn_nb``, else
``~/.cache/djinn_nb``, mode 0700 and owned by the user (anything else is refused: a token there
is a key to the server). One server per (model, device, dtype) — a second model asked for is a
second server, never a surprise reload of the first — and per server, named by ``key()``:

- ``local-<key>.json``: the state (pid, port, model, device, dtype, the start's nonce, and how
  busy it is: clients, runs, idle since), written atomically by the server once it listens;
- ``local-<key>.token``: its token (0600), written by whoever starts it, before it starts;
- ``local-<key>.lock``: ``flock``ed by a starter, so two first connects start one server;
- ``local-<key>.log``: the server's output.

This module imports nothing heavy: the client reads these files before (and instead of) any
torch import.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import BadRequestError, DjinnError

#: Seconds with no client connected and no paused run before the local server exits by itself
#: (``$DJINN_LOCAL_IDLE_SECONDS`` or ``djinn-server local --idle-seconds`` sets it).
IDLE_SECONDS = 1800.0
#: Seconds with no client connected after which it exits even though it keeps paused runs: runs a
#: kernel left behind are kept for a kernel restart, not for ever.
ORPHAN_SECONDS = 24 * 3600.0
#: Seconds a starter waits for a new server to load its model and listen.
START_SECONDS = 600.0


def home() -> Path:
    """The private directory (created 0700; one another user owns, or others may write, is refused;
    one others may only read is made 0700)."""
    env = os.environ.get("DJINN_HOME")
    if env:
        path = Path(env)
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(cache) / "djinn_nb"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise DjinnError(f"{path} belongs to another user: refusing to keep a server token there (set DJINN_HOME)")
    if stat.S_IMODE(st.st_mode) & 0o022:  # others could have planted a state or token file in it
        raise DjinnError(f"{path} is writable by others: refusing to trust what is in it (chmod 700 it, or set "
                         "DJINN_HOME)")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def idle_seconds() -> float:
    text = os.environ.get("DJINN_LOCAL_IDLE_SECONDS")
    if not text:
        return IDLE_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise BadRequestError(f"DJINN_LOCAL_IDLE_SECONDS must be a number of seconds > 0, not {text!r}")
    return value


def key(model: str | None, device: str, dtype: str | None) -> str:
    """The server's name: a digest of what it serves (a local directory by its absolute path)."""
    name = model or "embedded"
    if os.path.isdir(name):
        name = os.path.abspath(name)
    return hashlib.sha256(json.dumps([name, device, dtype]).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Files:
    state: Path
    token: Path
    lock: Path
    log: Path

    @classmethod
    def of(cls, server_key: str, directory: Path | None = None) -> "Files":
        d = directory or home()
        return cls(*(d / f"local-{server_key}.{ext}" for ext in ("json", "token", "lock", "log")))


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by this user only (0600 from creation)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_token(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def pid_alive(pid: Any) -> bool:
    if type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's: not a server of ours
        return False
    try:  # a zombie (exited, not yet reaped) is gone
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_local_server(pid: int) -> bool:
    """``pid`` is alive and runs ``djinn_nb.serving local`` (a recycled pid is something else)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return pid_alive(pid)  # no /proc: trust the pid
    return b"djinn_nb.serving" in args and b"local" in args


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds the socket listening on 127.0.0.1:``port`` (None: no /proc to
    tell). A client checks it before saying hello: its token goes only to its own server's socket,
    never to whoever took a dead server's port."""
    inodes = set()
    try:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and local == f"0100007F:{port:04X}":
                inodes.add(f"socket:[{inode}]")
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except (OSError, IndexError, ValueError):
        return None
    for fd in fds:
        try:
            if os.readlink(fd) in inodes:
                return True
        except OSError:
            continue
    return False


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600) for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def servers(directory: Path | None = None) -> list[tuple[Files, dict[str, Any]]]:
    """Every local server's files and state in the directory (live or stale), oldest first."""
    d = directory or home()
    found = []
    for path in sorted(d.glob("local-*.json")):
        state = read_json(path)
        if state is not None:
            found.append((Files.of(path.stem[len("local-"):], d), state))
    return sorted(found, key=lambda fs: fs[1].get("started", 0))


def remove(files: Files, pid: int | None = None) -> None:
    """Remove a server's state (only if it is still ``pid``'s, when given) and its token."""
    if pid is not None and (read_json(files.state) or {}).get("pid") != pid:
        return
    for path in (files.state, files.token):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def stop(files: Files, state: dict[str, Any], wait_s: float = 15.0) -> bool:
    """Stop one local server (SIGTERM, then SIGKILL after ``wait_s``) and remove its files.
    Returns whether a live server was stopped."""
    pid = state.get("pid")
    live = type(pid) is int and pid_alive(pid) and is_local_server(pid)
    if live:
        assert isinstance(pid, int)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    with locked(files.lock):
        remove(files, pid if type(pid) is int else None)
    return live


def stop_all(directory: Path | None = None) -> int:
    """Stop every local server in the directory; returns how many were running."""
    return sum(stop(files, state) for files, state in servers(directory))
