"""A victim's latency and the server's memory while another user attacks, with the defaults on (issue 22).

    python -m experiments.bench.sharing --out experiments/results/cpu-2core/sharing_defaults.json

One ``djinn-server`` process started with **no limit flags** (the limits it derives and
prints are recorded), a users file with two users: ``vera`` (the victim) and ``mal`` (the
attacker). Vera keeps a paused run and measures a one-token fork from it, and a fresh
connect, idle and then while mal runs each attack in a process of its own for
``--seconds``. Per attack: vera's median and worst fork, the ratio to idle (goal: median
≤ 5×), what the attack achieved (refusals, runs kept), and the server's RSS growth against the
bytes its runs are counted to hold (the stated margin: growth ≤ 1.5 × counted bytes + 300 MB).

The model is the tests' 4-block GPT-2 512 wide (``tests/server_proc.save_model``), so a step
takes milliseconds and an attack makes many requests; ``--model random:gpt2 --device cuda --dtype
bfloat16`` (or ``random:llama-7b``) runs the same on a GPU. On a 2-core machine the attacker's own
process competes with the server and the victim for the cores; the figures include that.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import djinn_nb
from djinn_nb import wire
from djinn_nb.errors import DjinnError
from djinn_nb.serving.limits import parse_bytes
from djinn_nb.wire.protocol import PROTOCOL
from djinn_nb.wire.transport import RPYC_CONFIG, open_connection

from ..exp3_whitebox.exp3lib.env import environment, write_json

PROMPT = [5, 17, 42, 99, 3, 250, 11, 7]
LONG = [(7 * i) % 500 for i in range(900)]
NEVER = " or ".join(["step < 0"] * 199)  # a never-true condition of 199 parts
NEVER_BPS = [{"layer": i % 4, "step": "all", "site": "resid_post", "when": NEVER} for i in range(5)]  # 995 parts


# ----- the attacks, each run by ``--attacker NAME`` in a process of its own until killed ----------------
def _quietly(fn: Callable[[], Any], tally: dict[str, int]) -> None:
    try:
        fn()
        tally["done"] = tally.get("done", 0) + 1
    except DjinnError as e:
        key = type(e).__name__
        tally[key] = tally.get(key, 0) + 1
    except (OSError, EOFError) as e:
        key = type(e).__name__
        tally[key] = tally.get(key, 0) + 1


def attack(name: str, address: str, token: str, stop_at: float) -> dict[str, int]:
    host, port = address.rsplit(":", 1)
    tally: dict[str, int] = {}
    kept: list[Any] = []
    if name in ("hold_runs", "fork_many", "lens_grid", "token_probs", "breakpoints", "huge_text", "reserve_side_channel"):
        mal = djinn_nb.connect(address, token=token)
    while time.monotonic() < stop_at:
        if name == "hold_runs":  # as many long runs as the quotas let one user keep
            _quietly(lambda: kept.append(mal.generate(LONG, max_new_tokens=2, breakpoints=[(3, 1)])), tally)
        elif name == "fork_many":
            if not kept:
                kept.append(mal.generate(LONG, max_new_tokens=40, breakpoints=[(1, 0)]))
            _quietly(lambda: kept[0].fork_many([{"scale": 1 + i / 64, "max_new_tokens": 8, "close": True}
                                                for i in range(64)]), tally)
        elif name == "lens_grid":
            _quietly(lambda: mal.lens_grid(LONG, k=50), tally)
        elif name == "token_probs":
            if not kept:
                kept.append(mal.generate(PROMPT, max_new_tokens=2))  # a finished run, listed 4,096 times
            _quietly(lambda: mal.token_probs([kept[0]] * 4096, 3), tally)
        elif name == "breakpoints":  # never-true conditions up to the 1,000-part cap, tested at every step
            _quietly(lambda: mal.generate(PROMPT, max_new_tokens=200, breakpoints=NEVER_BPS).close(), tally)
        elif name == "huge_text":
            _quietly(lambda: mal.generate("x" * (8 << 20), max_new_tokens=1), tally)
        elif name == "reserve_side_channel":
            _quietly(lambda: mal._call("expect", wire.dumps({"dtype": "float32", "shape": [1 << 28]})), tally)
        elif name == "hello_slots":  # idle sockets and a reconnect loop at the door
            try:
                kept.append(socket.create_connection((host, int(port))))
                if len(kept) > 64:
                    kept.pop(0).close()
                tally["sockets"] = tally.get("sockets", 0) + 1
            except OSError:
                tally["OSError"] = tally.get("OSError", 0) + 1
        elif name == "wrong_tokens":
            def guess() -> None:
                conn = open_connection(host, int(port))
                try:
                    wire.loads(conn.root.hello(PROTOCOL, "guess"))
                finally:
                    conn.close()
            _quietly(guess, tally)
        elif name == "garbage_frames":
            def garbage() -> None:
                with socket.create_connection((host, int(port))) as s:
                    s.sendall(struct.pack("!LB", 40, 0) + os.urandom(40))
                    s.settimeout(2)
                    s.recv(10)
            _quietly(garbage, tally)
        elif name == "connections":  # every connection one user may hold
            _quietly(lambda: kept.append(djinn_nb.connect(address, token=token)), tally)
            time.sleep(0.01)
        elif name == "unreleased_objects":
            def lookups() -> None:
                import rpyc

                conn = rpyc.connect(host, int(port), config=RPYC_CONFIG)
                wire.loads(conn.root.hello(PROTOCOL, token))
                held = [conn.root.runs for _ in range(5000)]  # never released
                del held
            _quietly(lookups, tally)
        else:
            raise SystemExit(f"unknown attack {name}")
    tally["kept"] = len(kept)
    return tally


ATTACKS = ["hold_runs", "fork_many", "lens_grid", "token_probs", "breakpoints", "huge_text", "reserve_side_channel",
           "hello_slots", "wrong_tokens", "garbage_frames", "connections", "unreleased_objects"]


# ----- the victim's side -------------------------------------------------------------------------------
def fork_ms(run: Any) -> float:
    t0 = time.perf_counter()
    run.fork(breakpoints=[], max_new_tokens=1, close=True)
    return (time.perf_counter() - t0) * 1e3


def connect_ms(address: str, token: str) -> float:
    t0 = time.perf_counter()
    djinn_nb.connect(address, token=token).close()
    return (time.perf_counter() - t0) * 1e3


class RssWatch:
    """The server's peak RSS while a block runs, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> "RssWatch":
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def held_bytes(admin: Any, victim: Any) -> int:
    """Bytes the server counts for every run but the victim's (the admin lists all; rows carry no owner)."""
    mine = {r["id"] for r in victim.runs()}
    return sum(int(r["bytes_held"]) for r in admin.runs() if r["id"] not in mine)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/out/sharing_defaults.json")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--samples", type=int, default=15)
    p.add_argument("--attacks", nargs="+", default=ATTACKS)
    p.add_argument("--model", default=None, help="djinn-server's --model (default: the tests' 4-block GPT-2), "
                   "e.g. random:gpt2 or random:llama-7b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="djinn-server's --dtype (default: the model's own; fp32 on CPU)")
    p.add_argument("--attacker", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.attacker:
        print(wire.dumps(attack(args.attacker, args.address, os.environ["DJINN_TOKEN"], time.monotonic() + args.seconds)))
        return 0
    from tests.server_proc import save_model, start  # the tests' server helpers (run as python -m experiments...)
    from djinn_nb.serving.users import add_user

    workdir = Path(tempfile.mkdtemp(prefix="djinn-sharing-"))
    users = workdir / "users.yaml"
    tokens = {name: add_user(users, name) for name in ("vera", "mal")}
    tokens["root"] = add_user(users, "root", admin=True)
    model_flags = ["--model", args.model or save_model(workdir), "--device", args.device]
    model_flags += ["--dtype", args.dtype] if args.dtype else []
    server = start([*model_flags, "--users", str(users)], workdir, timeout=900)
    server.tokens = tokens
    limits = next((line for line in server.log.read_text().splitlines() if "limits:" in line), "")
    cap = re.search(r"max_held_bytes ([0-9.]+) ([KMGT]?)B", limits)
    max_held = parse_bytes(cap.group(1) + cap.group(2)) if cap else None
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") and args.model else "float32")
    out: dict[str, Any] = {"environment": environment(args.device, dtype),
                           "model": args.model or "gpt2 4 blocks x 512 (tests)",
                           "server_flags": "none but --users (3 users: vera, mal, root admin)", "limits_line": limits,
                           "max_held_bytes": max_held, "rss_margin": "peak growth over the idle baseline <= 1.25 x max_held_bytes",
                           "attacks": {}}
    try:
        vera, root = server.connect("vera", tls_ca=None), server.connect("root", tls_ca=None)
        parked = vera.generate(PROMPT, max_new_tokens=4, breakpoints=[2])
        for _ in range(3):
            fork_ms(parked)
        idle = [fork_ms(parked) for _ in range(args.samples)]
        idle_connect = [connect_ms(server.address, tokens["vera"]) for _ in range(5)]
        base_rss = RssWatch(server.proc.pid).rss()
        out["idle"] = {"fork_median_ms": statistics.median(idle), "fork_max_ms": max(idle),
                       "connect_median_ms": statistics.median(idle_connect), "rss_mb": base_rss / 1e6}
        print("idle", out["idle"], flush=True)
        for name in args.attacks:
            env = {**os.environ, "DJINN_TOKEN": tokens["mal"], "PYTHONPATH": str(Path.cwd())}
            proc = subprocess.Popen([sys.executable, "-m", "experiments.bench.sharing", "--attacker", name, "--address",
                                     server.address, "--seconds", str(args.seconds)], env=env, stdout=subprocess.PIPE,
                                    text=True)
            with RssWatch(server.proc.pid) as watch:
                time.sleep(min(1.5, args.seconds / 4))  # the attack under way
                forks, connects, counted = [], [], 0
                while proc.poll() is None and len(forks) < 200:
                    forks.append(fork_ms(parked))
                    if len(forks) % 5 == 0:
                        connects.append(connect_ms(server.address, tokens["vera"]))
                        counted = max(counted, held_bytes(root, vera))
                    time.sleep(0.05)
                stdout, _ = proc.communicate(timeout=120)
            tally = wire.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
            grown = watch.peak - base_rss
            row = {"fork_median_ms": statistics.median(forks) if forks else None, "fork_max_ms": max(forks, default=None),
                   "forks": len(forks), "connect_median_ms": statistics.median(connects) if connects else None,
                   "fork_ratio": statistics.median(forks) / statistics.median(idle) if forks else None,
                   "connect_ratio": statistics.median(connects) / statistics.median(idle_connect) if connects else None,
                   "attacker": tally, "mal_counted_mb": counted / 1e6, "rss_growth_mb": grown / 1e6,
                   "rss_growth_over_max_held": grown / max_held if max_held else None,
                   "rss_within_margin": max_held is None or grown <= 1.25 * max_held, "server_alive": server.alive()}
            out["attacks"][name] = row
            print(name, row, flush=True)
            mine = {r["id"] for r in vera.runs()}
            for r in root.runs():  # the attacker's runs go, so each attack starts from the same state
                if r["id"] not in mine:
                    root._call("close", r["id"])
            time.sleep(1.0)
        rows = [r for r in out["attacks"].values() if r["fork_ratio"] is not None]
        out["summary"] = {"worst_fork_ratio": max(r["fork_ratio"] for r in rows),
                          "worst_connect_ratio": max((r["connect_ratio"] or 0) for r in rows),
                          "all_within_5x": all(r["fork_ratio"] <= 5 for r in rows),
                          "rss_all_within_margin": all(r["rss_within_margin"] for r in rows)}
        print(out["summary"])
    finally:
        server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
