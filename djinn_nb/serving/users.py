"""Who may use a server: users with token digests and quotas, and the throttle on guessing.

A users file (YAML) names each user with the SHA-256 of their token and optional
quotas; ``djinn-server add-user NAME --users FILE`` adds one and prints a new
random token once. The server keeps only digests: a token is hashed and compared,
in constant time, with every user's digest (no early exit, so timing reveals
neither which user nor how much matched). ``--token`` is the one-user shortcut.

Failed authentications are counted per peer address: past ``limit`` failures in
``window`` seconds that address is refused without its token being looked at
until the window passes, and the log gets one line per address per window, not
one per attempt.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import AuthenticationError, BadRequestError

log = logging.getLogger("djinn_nb.serving.auth")

QUOTA_KEYS = ("max_runs", "max_paused_bytes")


@dataclass(frozen=True)
class User:
    name: str
    token_sha256: bytes
    admin: bool = False
    max_runs: int | None = None
    max_paused_bytes: int | None = None


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def single_user(token: str | None) -> dict[str, User]:
    """``--token``: one user whose owner name is a digest of the token (never the token itself)."""
    if not token:
        return {}
    name = hashlib.sha256(token.encode()).hexdigest()[:16]
    return {name: User(name, digest(token))}


#: A user name: letters (any script), digits and ``. _ @ + -``, at most 64 characters.
USER_NAME = re.compile(r"[^\W_][\w.@+-]{0,63}")


def check_name(name: Any, where: str = "") -> str:
    if type(name) is not str or not USER_NAME.fullmatch(name):
        raise BadRequestError(f"{where}user name {str(name)[:80]!r}: use letters, digits and . _ @ + - "
                              "(at most 64 characters, starting with a letter or digit)")
    return name


def check_file_mode(path: Path) -> None:
    """Refuse a users file that another user could write (and so add themselves to)."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise BadRequestError(f"cannot read users file {path}: {e}") from None
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise BadRequestError(f"users file {path} is writable by others (mode {stat.S_IMODE(mode):o}); "
                              f"chmod 600 {path}")


def load_users(path: str | os.PathLike) -> dict[str, User]:
    """Parse a users file; any malformed entry is a ``BadRequestError`` naming it. A file others
    can write is refused."""
    check_file_mode(Path(path))
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise BadRequestError(f"cannot read users file {path}: {e}") from None
    entries = data.get("users") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise BadRequestError(f"{path}: expected 'users:' mapping names to {{token_sha256: hex, ...}}")
    users = {}
    for name, spec in entries.items():
        check_name(name, f"{path}: ")
        if not isinstance(spec, dict):
            raise BadRequestError(f"{path}: user {name!r} must map to {{token_sha256: hex, ...}}")
        unknown = set(spec) - {"token_sha256", "admin", *QUOTA_KEYS}
        if unknown:
            raise BadRequestError(f"{path}: user {name}: unknown keys {sorted(unknown)}")
        h = spec.get("token_sha256")
        try:
            raw = bytes.fromhex(h) if type(h) is str else b""
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise BadRequestError(f"{path}: user {name}: token_sha256 must be 64 hex digits")
        quotas = {}
        for k in QUOTA_KEYS:
            v = spec.get(k)
            if v is not None and (type(v) is not int or v < 0):
                raise BadRequestError(f"{path}: user {name}: {k} must be a non-negative integer")
            quotas[k] = v
        users[name] = User(name, raw, admin=spec.get("admin") is True, **quotas)
    return users


def add_user(path: str | os.PathLike, name: str, admin: bool = False, **quotas: int | None) -> str:
    """Add ``name`` to the users file (created if absent, mode 0600); returns its new random token."""
    p = Path(path)
    check_name(name)
    data: dict[str, Any] = {"users": {}}
    if p.exists():
        data = yaml.safe_load(p.read_text()) or {"users": {}}
        load_users(p)  # refuse to extend a malformed file
    if name in data["users"]:
        raise BadRequestError(f"user {name!r} already exists in {p}")
    token = secrets.token_urlsafe(32)
    entry: dict[str, Any] = {"token_sha256": digest(token).hex()}
    if admin:
        entry["admin"] = True
    entry.update({k: v for k, v in quotas.items() if v is not None})
    data["users"][name] = entry
    # A new temporary file of our own (O_EXCL, 0600), never one that exists already (a link
    # planted there would be followed), renamed over the file in one step.
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return token


class Authenticator:
    """Token -> user, in constant time, with failures throttled and their logging bounded."""

    def __init__(self, users: dict[str, User], limit: int = 10, window: float = 60.0):
        self.users = users
        self.limit, self.window = limit, window
        self._failures: dict[str, list[float]] = {}
        self._logged: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        """No users: anyone on the (loopback) address may connect."""
        return not self.users

    def authenticate(self, token: Any, peer: str) -> User | None:
        """The token's user (None on an open server); ``AuthenticationError`` otherwise."""
        if self.open:
            return None
        now = time.monotonic()
        # A correct token is never refused: tokens are 256-bit, so the throttle is not what stops
        # guessing — it bounds the log, and on an SSH tunnel every user shares 127.0.0.1, where a
        # throttle before the check would let anyone's wrong hellos lock everyone out.
        found = self.match(token)
        if found is not None:
            return found
        with self._lock:
            recent = [t for t in self._failures.get(peer, []) if now - t < self.window]
            self._failures[peer] = recent
            if len(recent) >= self.limit:
                wait = self.window - (now - recent[0])
                raise AuthenticationError(
                    f"too many failed authentications from this address; try again in {wait:.0f} s")
        self._fail(peer, now)
        raise AuthenticationError("wrong or missing token: pass token=... (or set DJINN_TOKEN)")

    def match(self, token: Any) -> User | None:
        """The user whose digest the token's is (every digest compared: no early exit); a missing
        or empty token matches nobody, whatever digests the file holds."""
        valid = type(token) is str and bool(token)
        given = digest(token) if valid else secrets.token_bytes(32)
        found = None
        for user in self.users.values():
            if hmac.compare_digest(given, user.token_sha256):
                found = user
        return found if valid else None

    def reload(self, users: dict[str, User]) -> None:
        """Swap in a re-read users file: a removed user's (or a changed token's) connections are
        refused from their next call; runs are left as they are (an admin may close them)."""
        self.users = users

    def _fail(self, peer: str, now: float) -> None:
        with self._lock:
            self._failures.setdefault(peer, []).append(now)
            if len(self._failures) > 4096:  # many addresses: forget the oldest
                for k in list(self._failures)[:1024]:
                    del self._failures[k]
            last = self._logged.get(peer)
            if last is None or now - last >= self.window:
                self._logged[peer] = now
                if len(self._logged) > 4096:
                    self._logged.clear()
                count = len(self._failures[peer])
                log.warning("failed authentication from %s (%d in the last %.0f s; further ones not logged "
                            "for %.0f s)", peer[:64], count, self.window, self.window)
