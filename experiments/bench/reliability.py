"""Figures for the README's reliability rows: a shared server under load and under attack.

    python -m experiments.bench.reliability --out experiments/results/cpu-2core/bench_sharing
    python -m experiments.bench.reliability --model random:gpt2 --device cuda:0 --out DIR   # on a GPU

Starts real ``djinn-server`` processes on loopback (the test helpers in
``tests/server_proc.py``: a 4-block GPT-2 512 wide, TLS, a users file) and records:
a fork's latency idle and while another user generates 400 tokens; how long a
vanished client's generation keeps stepping; how long a plain or wrongly-trusting
client takes to be refused; when silent peers are cut off; 32 concurrent
> 1 MiB fetches; and the server's RSS before, with and after 12 large runs.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import rpyc

import djinn_nb
from djinn_nb.errors import DjinnError
from djinn_nb import wire
from djinn_nb.wire.protocol import PROTOCOL
from djinn_nb.wire.transport import open_connection

from ..exp3_whitebox.exp3lib.env import environment, model_dtype, write_json

PROMPT = [5, 17, 42, 99, 3, 250, 11, 7]


def _lab(model: str | None, device: str):
    from tests import server_proc  # the repository root is on the path (python -m experiments...)

    gen = server_proc.lab_server(model, device)
    return gen, next(gen)


def fork_ms(run) -> float:
    t0 = time.perf_counter()
    run.fork(breakpoints=[], max_new_tokens=1).close()
    return (time.perf_counter() - t0) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="default: a 4-block GPT-2 512 wide (the tests' model)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    gen, lab = _lab(args.model, args.device)
    out: dict = {"environment": environment(args.device, model_dtype(None, args.device, args.model or "random")), "model": args.model or "gpt2-4x512 (tests)"}
    try:
        alice, bob, root = lab.connect("alice"), lab.connect("bob"), lab.connect("root")
        parked = bob.generate(PROMPT, max_new_tokens=2, breakpoints=[2])
        fork_ms(parked)
        idle = [fork_ms(parked) for _ in range(20)]
        done: dict = {}

        def long() -> None:
            t0 = time.perf_counter()
            alice.generate(PROMPT, max_new_tokens=400)
            done["s"] = time.perf_counter() - t0

        t = threading.Thread(target=long)
        t.start()
        time.sleep(0.3)
        busy = []
        while t.is_alive() and len(busy) < 40:
            busy.append(fork_ms(parked))
        t.join()
        out["fork_ms"] = {"idle_median": statistics.median(idle), "busy_median": statistics.median(busy),
                          "busy_max": max(busy), "generation_400_s": done["s"], "forks_during": len(busy)}

        conn = open_connection("127.0.0.1", lab.port, ssl_context=root._ssl)
        wire.loads(conn.root.hello(PROTOCOL, lab.tokens["bob"]))
        rpyc.async_(conn.root.generate)(wire.dumps({"prompt": PROMPT, "max_new_tokens": 400}))
        while not [r for r in root.runs() if r["state"] == "running"]:
            time.sleep(0.005)
        rid = [r["id"] for r in root.runs() if r["state"] == "running"][0]
        t0 = time.monotonic()
        conn._channel.stream.sock.shutdown(socket.SHUT_RDWR)
        while rid in {r["id"] for r in root.runs()}:
            time.sleep(0.002)
        out["vanished_client_stopped_after_ms"] = (time.monotonic() - t0) * 1e3
        conn.close()

        refusals = {}
        for name, kw in (("plain client to TLS", {}), ("other CA", {"tls_ca": str(lab.files / "other.pem")})):
            if "tls_ca" in kw:
                from tests import server_proc  # the repository root is on the path (python -m experiments...)

                server_proc.make_cert(lab.files, "other")
            t0 = time.monotonic()
            try:
                djinn_nb.connect(lab.address, token=lab.tokens["alice"], **kw)
            except DjinnError:
                refusals[name] = (time.monotonic() - t0) * 1e3
        out["refused_ms"] = refusals

        big = bob.generate([(7 * i) % 500 for i in range(600)], max_new_tokens=2, breakpoints=[1])
        clients = [lab.connect("bob") for _ in range(32)]
        barrier, ok = threading.Barrier(32), []

        def fetch(c) -> None:
            barrier.wait()
            t = c.attach(big.id).activation()
            ok.append(t.numel() * t.element_size())

        t0 = time.perf_counter()
        ths = [threading.Thread(target=fetch, args=(c,)) for c in clients]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        out["fetch_32x"] = {"ok": len(ok), "bytes_each": max(ok, default=0), "wall_s": time.perf_counter() - t0}
        for c in clients:
            c.close()
        big.close()

        prompt = [(11 * i) % 500 for i in range(600)]
        bob.generate(prompt, max_new_tokens=2, breakpoints=[3]).close()
        time.sleep(1)
        base = lab.rss()
        runs = [bob.generate(prompt, max_new_tokens=2, breakpoints=[3], watches=[(0, 0), (1, 0), (2, 0)])
                for _ in range(12)]
        held = sum(r.refresh().bytes_held for r in runs)
        peak = lab.rss()
        for r in runs:
            r.close()
        time.sleep(2)
        out["rss_mb"] = {"baseline": base / 1e6, "with_12_runs": peak / 1e6, "held_by_runs": held / 1e6,
                         "2s_after_close": lab.rss() / 1e6}
    finally:
        try:
            next(gen)
        except StopIteration:
            pass
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / "bench_sharing.json", out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
