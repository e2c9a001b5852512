"""Small-call latency through the client (issue 14, goal <= 1.15x a bare rpyc echo call).

    python -m experiments.bench.calls [--rounds 15] [--calls 200] [--out DIR]

Measured side by side in one run, each against a server in another process over
loopback with TCP_NODELAY on both ends:

- ``rpyc_echo``: a bare rpyc service (rpyc's own ``connect`` and channel) whose
  ``exposed_echo(s)`` returns its argument: the floor the goal is stated against.
- ``rpyc_echo_fast``: the same echo over djinn_nb's transport (``FastChannel``, the
  locked-down config) — what rpyc costs on the path djinn_nb uses.
- ``rpyc_echo_fast_spin`` (when the client spins, see ``connect(spin_us=)``): that echo with the
  client's spin: what the transport the client uses costs.
- ``runs``: ``client.runs()`` with two runs on the server.
- ``refresh``: ``run.refresh()`` of a paused run (the ``status`` call).
- ``rpyc_echo_after_resume`` / ``_fork``: the bare echo, its server busy-waiting as long as the
  engine's median resume / fork took (measured in the warm-up) before answering; reported less
  that wait: what a round trip costs when the client has been waiting that long (it may have to
  wake up), the floor for resume and fork (``ratio_to_waiting_echo``).
- ``resume`` / ``fork``: ``run.resume()`` (no tensors, no edit) of a run paused at every
  step, and ``run.fork(scale=0.9, breakpoints=[], max_new_tokens=step+1)``. These do
  engine work (a step of a tiny random model), so the server process times each
  ``Engine.resume`` / ``Engine.fork`` call and the benchmark reports the client's
  round trip *minus* that engine time, call by call: the cost of the call itself
  (client wrapper, JSON, rpyc, service dispatch, the run summary). The fork's
  ``run.close()`` is not timed.

Variants are interleaved round by round (each round: ``--calls`` calls of each, in a
shuffled order); per round, each variant's median is divided by ``rpyc_echo``'s median
of the same round; reported: the median and 25th-75th percentiles of those ratios.
Runs from the repository root without installing (``-m`` puts it on the path); needs
rpyc and plumbum (on a GPU image: carried wheels on ``PYTHONPATH``), torch and transformers.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]

ECHO_SERVER = r"""
import socket, sys, time, rpyc
from rpyc.utils.server import ThreadedServer
class Echo(rpyc.Service):
    def on_connect(self, conn):
        conn._channel.stream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def exposed_echo(self, s):
        return s
    def exposed_echo_after(self, s, seconds):  # a server that works as long as the engine did, then answers
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
        return s
srv = ThreadedServer(Echo, hostname="127.0.0.1", port=0)
srv._listen()
print("PORT", srv.port, flush=True)
srv.start()
"""

# A djinn server on a tiny random model whose Engine.resume/fork record their own duration;
# the client reads those durations back over stdin/stdout at the end (not through rpyc).
DJINN_SERVER = r"""
import json, os, sys, threading, time
import torch
if os.environ.get("BENCH_SERVER_THREADS"):  # torch intra-op threads in the server (default: torch's own)
    torch.set_num_threads(int(os.environ["BENCH_SERVER_THREADS"]))
from djinn_nb.serving.server import DjinnServer, build_engine
engine = build_engine("random:gpt2-tiny", "cpu")
spent = {"resume": [], "fork": []}
def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[name].append(time.perf_counter() - t)
    wrapper.djinn_call = getattr(fn, "djinn_call", False)  # the server serves only its wrapped calls
    return wrapper
engine.resume = timed("resume", engine.resume)
engine.fork = timed("fork", engine.fork)
from djinn_nb.serving.service import DjinnService
spent.update(service_resume=[], service_fork=[], service_status=[], service_runs=[])
for name in ("resume", "fork", "status", "runs"):  # the whole exposed call, as rpyc's dispatch sees it
    setattr(DjinnService, "exposed_" + name, timed("service_" + name, getattr(DjinnService, "exposed_" + name)))
server = DjinnServer(engine, "127.0.0.1", 0).start()
print("PORT", server.port, flush=True)
for line in sys.stdin:
    if line.strip() == "spent":
        print("SPENT " + json.dumps(spent), flush=True)
        for v in spent.values():
            v.clear()
server.close()
"""


#: the exposed call behind each client call (its whole time in the server is recorded too)
SERVICE_OF = {"resume": "service_resume", "fork": "service_fork", "refresh": "service_status", "runs": "service_runs"}


def _spawn(code: str) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         cwd=ROOT, env=env)
    while True:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError("server process exited before listening")
        if line.startswith("PORT "):
            return p, int(line.split()[1])


def _times(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def versions() -> dict[str, Any]:
    from ..exp3_whitebox.exp3lib.env import environment

    env = environment("cpu", None)  # small calls: no tensors of a model are timed
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    return env


def main(argv: list[str] | None = None) -> int:
    import rpyc

    import djinn_nb
    from djinn_nb.wire.transport import open_connection

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--out", default=None)
    p.add_argument("--label", default="", help="a note stored with the result (e.g. before/after)")
    p.add_argument("--spin-us", type=int, default=None, help="the client's spin_us (default: connect()'s default)")
    args = p.parse_args(argv)

    echo_proc, echo_port = _spawn(ECHO_SERVER)
    djinn_proc, djinn_port = _spawn(DJINN_SERVER)
    try:
        bare = rpyc.connect("127.0.0.1", echo_port)
        bare._channel.stream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        bare_echo = bare.root.echo
        fast = open_connection("127.0.0.1", echo_port)  # djinn_nb's transport and locked-down config
        fast_echo = fast.root.echo

        client = djinn_nb.connect(f"127.0.0.1:{djinn_port}", spin_us=args.spin_us)
        client_spin_s = client._conn._channel.stream.spin_s  # waits on replies without sleeping this long
        fast_spin = open_connection("127.0.0.1", echo_port, spin_s=client_spin_s)  # the transport as the client has it
        fast_spin_echo = fast_spin.root.echo
        prompt = [1, 2, 3, 4, 5, 6]
        paused = client.generate(prompt, max_new_tokens=2, breakpoints=[6])
        client.generate(prompt, max_new_tokens=2)  # a finished run, so that runs() lists more than one
        arg = paused.id  # an echo of a run id: the size of the small calls' argument
        state: dict[str, Any] = {}

        def fresh_stepper() -> None:
            """A run paused at every step with room for a round of resumes (made outside the timing)."""
            if "stepper" in state:
                state["stepper"].close()
            state["stepper"] = client.generate(prompt, max_new_tokens=args.calls + 30, breakpoints=[(6, "all")])

        def resume() -> None:
            state["stepper"].resume()

        closes: list = []  # forks to close after their round, untimed

        def fork() -> None:
            closes.append(paused.fork(scale=0.9, breakpoints=[], max_new_tokens=1))

        def _read_spent() -> dict[str, list[float]]:
            while True:
                line = djinn_proc.stdout.readline()
                if line.startswith("SPENT "):
                    return json.loads(line[6:])

        variants: dict[str, Callable[[], Any]] = {
            "rpyc_echo": lambda: bare_echo(arg),
            "rpyc_echo_fast": lambda: fast_echo(arg),
            **({"rpyc_echo_fast_spin": lambda: fast_spin_echo(arg)} if client_spin_s else {}),
            "runs": client.runs,
            "refresh": paused.refresh,
            "resume": resume,
            "fork": fork,
        }
        engine_timed = {"resume", "fork"}
        fresh_stepper()
        for fn in variants.values():  # warm-up
            for _ in range(20):
                fn()
        for f in closes:
            f.close()
        closes.clear()
        djinn_proc.stdin.write("spent\n")
        djinn_proc.stdin.flush()
        warm = _read_spent()
        # the floor for a call that waits on the engine: an echo whose server busy-waits as long
        bare_echo_after = bare.root.echo_after
        waits = {name: statistics.median(warm[name]) for name in engine_timed}
        for name in engine_timed:
            variants[f"rpyc_echo_after_{name}"] = lambda d=waits[name]: bare_echo_after(arg, d)

        rng = random.Random(0)
        per_round: dict[str, list[float]] = {k: [] for k in variants}
        engine_med: dict[str, list[float]] = {k: [] for k in engine_timed}
        service: dict[str, list[float]] = {k: [] for k in SERVICE_OF}
        for r in range(args.rounds):
            order = list(variants)
            rng.shuffle(order)
            meds = {}
            for name in order:
                if name == "resume":
                    fresh_stepper()
                    djinn_proc.stdin.write("spent\n")  # forget the engine time of anything untimed
                    djinn_proc.stdin.flush()
                    _read_spent()
                ts = _times(variants[name], args.calls)
                if name in engine_timed or name in ("refresh", "runs"):
                    djinn_proc.stdin.write("spent\n")
                    djinn_proc.stdin.flush()
                    all_spent = _read_spent()
                    in_service = all_spent[SERVICE_OF[name]]
                    if name in engine_timed:  # call by call: the exposed call's time less its engine call's
                        in_service = [a - b for a, b in zip(in_service, all_spent[name])]
                    service[name].append(statistics.median(in_service))
                if name in engine_timed:
                    spent = all_spent[name]
                    if len(spent) != len(ts):
                        raise RuntimeError(f"{name}: {len(ts)} calls but {len(spent)} engine timings")
                    engine_med[name].append(statistics.median(spent))
                    ts = [a - b for a, b in zip(ts, spent)]
                if name.startswith("rpyc_echo_after_"):
                    ts = [t - waits[name.removeprefix("rpyc_echo_after_")] for t in ts]
                if name == "fork":
                    for f in closes:
                        f.close()
                    closes.clear()
                meds[name] = statistics.median(ts)
            for name, m in meds.items():
                per_round[name].append(m)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in meds.items()),
                  flush=True)
        client.close()
    finally:
        for proc in (echo_proc, djinn_proc):
            try:
                proc.stdin.close()
            except OSError:
                pass
            proc.kill()
            proc.wait()

    result: dict[str, Any] = {
        "what": "median round trip per round (engine time subtracted for resume/fork), and its ratio to a bare "
                "rpyc echo in the same round; median and p25..p75 over rounds",
        "goal_ratio": 1.15, "rounds": args.rounds, "calls_per_round": args.calls, "label": args.label,
        "load_avg": os.getloadavg(), "variants": {},
        "client_spin_s": client_spin_s,
    }
    for name, meds in per_round.items():
        ratios = sorted(m / e for m, e in zip(meds, per_round["rpyc_echo"]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        v = {"us_median": statistics.median(meds) * 1e6, "ratio_to_rpyc_echo": statistics.median(ratios),
             "ratio_p25": q[0], "ratio_p75": q[2]}
        if name in engine_med:
            v["engine_us_median_subtracted"] = statistics.median(engine_med[name]) * 1e6
            waited = per_round[f"rpyc_echo_after_{name}"]
            w = sorted(m / e for m, e in zip(meds, waited))
            qw = statistics.quantiles(w, n=4) if len(w) > 1 else [w[0]] * 3
            # against an echo whose server works as long (the client then wakes from the same wait)
            v.update(ratio_to_waiting_echo=statistics.median(w), waiting_ratio_p25=qw[0], waiting_ratio_p75=qw[2],
                     waiting_echo_us_less_wait=statistics.median(waited) * 1e6)
        if service.get(name):
            # inside the exposed call but outside the engine: the service's own work (JSON, checks, summary)
            v["service_us_median_without_engine"] = statistics.median(service[name]) * 1e6
        result["variants"][name] = v
    result["environment"] = versions()
    print(f"{'call':16s} {'us':>8s} {'x echo':>7s} {'p25..p75':>13s}")
    for name, v in result["variants"].items():
        extra = f"   (engine {v['engine_us_median_subtracted']:.0f} us subtracted)" if "engine_us_median_subtracted" in v else ""
        if "ratio_to_waiting_echo" in v:
            extra += (f"   vs an echo whose server waits as long: {v['ratio_to_waiting_echo']:.2f}x "
                      f"({v['waiting_echo_us_less_wait']:.0f} us)")
        if "service_us_median_without_engine" in v:
            extra += f"   service's own work {v['service_us_median_without_engine']:.0f} us"
        print(f"{name:16s} {v['us_median']:8.1f} {v['ratio_to_rpyc_echo']:7.2f} "
              f"{v['ratio_p25']:6.2f}..{v['ratio_p75']:<6.2f}{extra}")
    if args.out:
        from ..exp3_whitebox.exp3lib.env import write_json

        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = f"bench_calls{'_' + args.label if args.label else ''}.json"
        write_json(Path(args.out) / name, result)
        print("written", Path(args.out) / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
