"""Small-call latency (issue 2/3): where a client round trip's time goes.

    python -m experiments.bench.rpc [--out DIR]

Medians of many round trips, each measured side by side in one run:
a raw TCP ping-pong between two threads of one process and between two
processes (the floor), and djinn_nb's ``status`` call to an embedded server
(same process, another thread) and to a ``djinn-server`` subprocess.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ECHO = (
    "import socket,sys\n"
    "s=socket.socket();s.bind(('127.0.0.1',0));s.listen(1);print(s.getsockname()[1],flush=True)\n"
    "c,_=s.accept();c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\n"
    "while True:\n d=c.recv(64)\n if not d: break\n c.sendall(d)\n"
)


def _pingpong(sock: socket.socket, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        sock.sendall(b"x" * 32)
        sock.recv(64)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def raw_thread(n: int) -> float:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def echo() -> None:
        c, _ = srv.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while d := c.recv(64):
            c.sendall(d)

    threading.Thread(target=echo, daemon=True).start()
    s = socket.create_connection(srv.getsockname())
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ms = _pingpong(s, n)
    s.close()
    return ms


def raw_process(n: int) -> float:
    p = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    port = int(p.stdout.readline())
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ms = _pingpong(s, n)
    s.close()
    p.kill()
    return ms


def djinn_status(client, n: int) -> float:
    run = client.generate([1, 2, 3, 4], max_new_tokens=2, breakpoints=[1])
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        run.refresh()
        ts.append(time.perf_counter() - t)
    run.close()
    return statistics.median(ts) * 1e3


def main(argv: list[str] | None = None) -> int:
    import djinn_nb

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--model", default="random:gpt2-tiny")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    res = {"raw_tcp_threads_ms": raw_thread(args.n), "raw_tcp_processes_ms": raw_process(args.n)}
    res["djinn_status_embedded_ms"] = djinn_status(djinn_nb.connect(model=args.model), args.n)
    srv = subprocess.Popen(
        [sys.executable, "-m", "djinn_nb.serving", "--model", args.model, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )
    try:
        address = srv.stdout.readline().rsplit(" at ", 1)[1].strip()
        res["djinn_status_subprocess_ms"] = djinn_status(djinn_nb.connect(address), args.n)
    finally:
        srv.kill()
    for k, v in res.items():
        print(f"{k:30s} {v:.3f} ms")
    if args.out:
        from ..exp3_whitebox.exp3lib.env import environment, write_json

        write_json(Path(args.out) / "bench_rpc.json", {**res, "environment": environment("cpu", None)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
