"""``djinn-server`` (or ``python -m djinn_nb.serving``): load a model and serve it.

``djinn-server add-user NAME --users FILE`` adds a user to a users file and prints
their new token once (only its SHA-256 is stored); ``kill -HUP`` on a running server
re-reads the file. ``djinn-server status`` lists the per-user local servers ``connect()`` started,
``djinn-server stop`` stops them (``localserver.py``).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from ..errors import DjinnError
from .. import wire
from ..wire.protocol import DEFAULT_PORT
from .lease import DEFAULT_LEASE_SECONDS
from .limits import (DEFAULT_CALL_STEPS, DEVICE_SHARE, HOST_SHARE, OFFLOAD_HOST_SHARE, USER_MAX_RUNS,
                     derive_limits, parse_bytes, reshare)
from .server import DjinnServer, build_engine, is_loopback

log = logging.getLogger("djinn_nb.serving.cli")


def add_user_main(argv: list[str]) -> int:
    from .users import add_user

    p = argparse.ArgumentParser(prog="djinn-server add-user", description="Add a user; prints their token once.")
    p.add_argument("name")
    p.add_argument("--users", required=True, help="the users file (created if absent, mode 0600)")
    p.add_argument("--admin", action="store_true", help="may list and close every user's runs")
    p.add_argument("--max-runs", type=int, default=None)
    p.add_argument("--max-paused-bytes", type=int, default=None)
    args = p.parse_args(argv)
    try:
        token = add_user(args.users, args.name, args.admin, max_runs=args.max_runs,
                         max_paused_bytes=args.max_paused_bytes)
    except DjinnError as e:
        print(f"djinn-server add-user: {e}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _lease(text: str) -> float | None:
    if text.strip().lower() in ("none", "never"):
        return None
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"a number of seconds > 0, or 'none', not {text!r}")
    return value


def _reload_on_sighup(server: DjinnServer, path: str | None, given: set[str]) -> None:
    """``kill -HUP <pid>`` re-reads the users file (revoking a token, changing a quota) without
    closing anyone's runs; a file that does not load keeps the users as they were. Without a
    users file a SIGHUP is logged and ignored (it used to end the server)."""
    from .users import load_users

    def reload(signum: int, frame: object) -> None:
        if path is None:
            log.info("SIGHUP: no users file to reload (--users FILE)")
            return
        try:
            users = load_users(path)
        except DjinnError as e:
            log.warning("users file not reloaded, the users stay as they were: %s", e)
            return
        server.state.auth.reload(users)
        reshare(server.limits, len(users), given)  # a user's share follows how many users there are now
        log.info("users file reloaded: %d users; %s", len(users), server.limits.describe())

    signal.signal(signal.SIGHUP, reload)


#: Limits derived at start-up unless a flag gives them (see limits.py).
_DERIVED = ("max_held_bytes", "user_max_held_bytes", "user_max_runs", "user_max_connections", "max_call_steps")


def _size(text: str) -> int | None:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _count(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a whole number > 0, or 'none', not {text!r}")
    return value


def _sae_dirs(args: argparse.Namespace) -> tuple[str, ...] | None:
    """Where SAEs may load from: the --sae-dir flags; with none, anywhere for one user on loopback, and
    nowhere for a shared server (a user's path would otherwise probe the server's disk)."""
    if args.sae_dir:
        return tuple(args.sae_dir)
    return () if (args.users or not is_loopback(args.host)) else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["add-user"]:
        return add_user_main(argv[1:])
    if argv[:1] in (["local"], ["status"], ["stop"]):  # the per-user local server (localserver.py)
        from . import localserver

        return {"local": localserver.local_main, "status": localserver.status_main,
                "stop": localserver.stop_main}[argv[0]](argv[1:])
    p = argparse.ArgumentParser(prog="djinn-server", description="Serve a causal LM with breakpoints over rpyc.")
    p.add_argument("--model", default=None, help="hub id, local directory, 'embedded' (default) or 'random:<shape>'")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 (default cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    p.add_argument("--device-map", default=None, help="'auto' splits the model over GPUs (accelerate)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (printed)")
    p.add_argument("--token", default=os.environ.get("DJINN_TOKEN"),
                   help="one-user shortcut (default: $DJINN_TOKEN; prefer the environment to the command line)")
    p.add_argument("--users", default=None, help="users file: name -> token_sha256, admin, max_runs, max_paused_bytes")
    p.add_argument("--tls-cert", default=None, help="PEM certificate: both channels under TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--max-payload-bytes", type=int, default=wire.DEFAULT_MAX_PAYLOAD)
    p.add_argument("--lease-seconds", type=_lease, default=DEFAULT_LEASE_SECONDS,
                   help=f"close runs untouched this long (default {DEFAULT_LEASE_SECONDS:g}; 'none': never)")
    p.add_argument("--max-paused-bytes", type=int, default=None,
                   help="offload least-recently-used paused runs to host memory above this many device bytes")
    p.add_argument("--max-held-bytes", type=_size, default=argparse.SUPPRESS,
                   help=f"refuse a call that would take all runs together (device and host) past this many bytes "
                        f"(e.g. 8G; 'none': no limit). Default: {HOST_SHARE * 100:.0f}%% of the host memory available at "
                        f"start-up; on a GPU {DEVICE_SHARE * 100:.0f}%% of the device memory free after the load "
                        f"+ {OFFLOAD_HOST_SHARE * 100:.0f}%% of the host's")
    p.add_argument("--user-max-held-bytes", type=_size, default=argparse.SUPPRESS,
                   help="the same for one user, where the users file gives no max_paused_bytes "
                        "(default: half of --max-held-bytes when the users file has several users)")
    p.add_argument("--user-max-runs", type=_count, default=argparse.SUPPRESS,
                   help=f"runs one user may keep, where the users file gives no max_runs (default {USER_MAX_RUNS})")
    p.add_argument("--user-max-connections", type=_count, default=argparse.SUPPRESS,
                   help="connections one user may hold open (default: half of --max-connections when the users "
                        "file has several users)")
    p.add_argument("--user-max-saes", type=_count, default=16, help="SAEs one user may keep loaded (default 16)")
    p.add_argument("--sae-dir", action="append", default=None,
                   help="load SAEs only from under this directory (repeatable; default: any directory the server "
                        "can read when it serves one user on loopback, none when it has a users file or binds "
                        "off loopback)")
    p.add_argument("--max-call-seconds", type=float, default=600.0,
                   help="stop (and close the run of) a call still stepping after this long (default 600)")
    p.add_argument("--max-call-steps", type=_count, default=argparse.SUPPRESS,
                   help=f"refuse max_new_tokens above this (default: the model's positions, else {DEFAULT_CALL_STEPS})")
    p.add_argument("--max-connections", type=int, default=256)
    p.add_argument("--max-unauthenticated", type=int, default=64, help="connections not yet past hello")
    p.add_argument("--hello-seconds", type=float, default=10.0, help="time a new connection has to authenticate")
    p.add_argument("--max-auth-failures", type=int, default=20,
                   help="failed hellos per address per minute before that address is refused for the minute")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="keep forks on the eager path (default: replay the layers after a checkpoint as a CUDA graph)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    token = None if args.users else args.token
    if not is_loopback(args.host) and not (token or args.users):
        print(
            f"djinn-server: refusing to bind {args.host} without a token; pass --token SECRET or set DJINN_TOKEN, "
            "or --users FILE",
            file=sys.stderr,
        )
        return 2
    try:
        users = None
        if args.users:
            from .users import load_users

            users = load_users(args.users)
        engine = build_engine(args.model, args.device, args.dtype, args.device_map,
                              cuda_graphs=False if args.no_cuda_graphs else None)
        given = {name: getattr(args, name) for name in _DERIVED if hasattr(args, name)}
        limits = derive_limits(
            dict(given, max_connections=args.max_connections, max_unauthenticated=args.max_unauthenticated,
                 hello_seconds=args.hello_seconds, max_call_seconds=args.max_call_seconds,
                 auth_failures=args.max_auth_failures, user_max_saes=args.user_max_saes,
                 sae_dirs=_sae_dirs(args)),
            device=engine.device, max_positions=engine.max_positions, users=len(users or {}) or (1 if token else 0))
        server = DjinnServer(engine, args.host, args.port, token, args.max_payload_bytes, args.lease_seconds,
                             args.max_paused_bytes, users=users, tls_cert=args.tls_cert, tls_key=args.tls_key,
                             limits=limits)
    except DjinnError as e:
        print(f"djinn-server: {e}", file=sys.stderr)
        return 2
    _reload_on_sighup(server, args.users, set(given))
    info = engine.info()
    tls_note = " (TLS)" if args.tls_cert else ""
    print(f"djinn-server: {info['model']} ({info['num_layers']} layers) on {info['device']} at {server.address}"
          f"{tls_note}", flush=True)
    print(f"djinn-server: {limits.describe()}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
