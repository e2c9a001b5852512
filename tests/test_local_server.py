"""The per-user local server (``connect(embedded=False)``, ``DJINN_LOCAL=process``): a background
``djinn-server`` on loopback that a fresh process finds and reaches in well under a second, that
keeps a killed kernel's paused runs for the next one, that exits by itself when idle, and whose
files are private. Each test has its own ``DJINN_HOME`` (the ``local_home`` fixture stops its servers)."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import djinn_nb
from djinn_nb.core.reference import generate, hf_model
from djinn_nb.errors import BadRequestError, DjinnError
from djinn_nb.serving import localhome

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [5, 17, 42, 99, 3, 250, 11, 7]
N = 10


def python(code: str, env_extra: dict[str, str] | None = None, timeout: float = 300) -> dict:
    """Run ``code`` in a fresh interpreter (a kernel, fresh or restarted); its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT)
    assert out.returncode in (0, -signal.SIGKILL), out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def only_server(home: Path) -> tuple[localhome.Files, dict]:
    found = localhome.servers(home)
    assert len(found) == 1, found
    return found[0]


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not localhome.pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_a_restarted_kernel_resumes_its_paused_run_to_the_exact_tokens(local_home, saved_models):
    path = saved_models["gpt2-tiny"]
    kernel = ("import djinn_nb, json, os, signal\n"
              f"c = djinn_nb.connect(model={path!r})\n"
              f"r = c.generate({PROMPT}, max_new_tokens={N}, breakpoints=[(1, 3)])\n"
              "print(json.dumps({'id': r.id, 'paused': r.paused, 'step': r.step}), flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)  # the kernel dies, it does not close anything\n")
    first = python(kernel, {"DJINN_LOCAL": "process"})
    assert first["paused"] and first["step"] == 3
    _, state = only_server(local_home)
    restarted = ("import time; t0 = time.perf_counter()\n"
                 "import djinn_nb, json, sys\n"
                 f"c = djinn_nb.connect(model={path!r})\n"
                 "rows = c.runs()\n"
                 "ready = time.perf_counter() - t0\n"
                 "torch_after_connect = 'torch' in sys.modules\n"
                 f"run = c.attach({first['id']!r})\n"
                 "while run.paused:\n"
                 "    run.resume()\n"
                 "print(json.dumps({'rows': rows, 'tokens': run.token_ids, 'ready': ready,\n"
                 "                  'torch': torch_after_connect}))\n")
    second = python(restarted, {"DJINN_LOCAL": "process"})
    assert [(r["id"], r["state"], r["layer"], r["step"]) for r in second["rows"]] == [(first["id"], "paused", 1, 3)]
    assert second["tokens"] == generate(hf_model(path), PROMPT, N) and len(second["tokens"]) == N
    assert not second["torch"], "connect() and runs() must not import torch"
    _, again = only_server(local_home)
    assert again["pid"] == state["pid"], "the restarted kernel reached the same server, not a new one"


def test_connect_in_a_fresh_process_is_ready_in_under_a_second(local_home, saved_models):
    path = saved_models["gpt2-tiny"]
    djinn_nb.connect(model=path, embedded=False).close()  # the server is running
    code = ("import time; t0 = time.perf_counter()\n"
            "import djinn_nb, json, sys\n"
            f"c = djinn_nb.connect(model={path!r}, embedded=False)\n"
            "run = c.generate([1, 2, 3], max_new_tokens=1)\n"
            "ready = time.perf_counter() - t0\n"
            "print(json.dumps({'ready': ready, 'done': run.done, 'mods': sorted(m for m in sys.modules\n"
            "                  if m.split('.')[0] in ('torch', 'transformers', 'numpy'))}))\n")
    runs = [python(code) for _ in range(3)]
    assert all(r["done"] and r["mods"] == [] for r in runs), runs
    assert min(r["ready"] for r in runs) <= 1.0, runs  # imports included; ~0.15 s on an idle machine
    # and the import itself, as python -X importtime sees it: neither torch nor transformers
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import djinn_nb; djinn_nb.connect"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "djinn_nb.client.connection" in imported and not {"torch", "transformers"} & imported


@pytest.mark.attack(cls="door", tried="sockets that never say hello, reconnecting to keep a local server up",
                    held="it exits at its idle time all the same")
def test_the_server_exits_by_itself_once_idle(local_home, saved_models, monkeypatch):
    monkeypatch.setenv("DJINN_LOCAL_IDLE_SECONDS", "1.5")
    client = djinn_nb.connect(model=saved_models["gpt2-tiny"], embedded=False)
    files, state = only_server(local_home)
    assert state["idle_seconds"] == 1.5 and state["model"] == saved_models["gpt2-tiny"]
    kept = client.generate(PROMPT, max_new_tokens=3, breakpoints=[2])
    client.close()
    time.sleep(4)  # no client, but a paused run: it stays for a kernel restart
    assert localhome.pid_alive(state["pid"])
    client = djinn_nb.connect(model=saved_models["gpt2-tiny"], embedded=False)
    client.attach(kept.id).close()
    time.sleep(3)  # a client, no run: it stays while someone is connected
    assert localhome.pid_alive(state["pid"])
    client.close()
    stop, socks = threading.Event(), []

    def knock() -> None:  # another local user's sockets that never say hello must not keep it up
        while not stop.is_set():
            try:
                socks.append(socket.create_connection(("127.0.0.1", state["port"]), timeout=1))
            except OSError:
                pass
            stop.wait(0.3)

    threading.Thread(target=knock, daemon=True).start()
    try:
        assert wait_gone(state["pid"], 15), "no client, no paused run for the idle time: the server exits"
    finally:
        stop.set()
        for sock in socks:
            sock.close()
    assert not files.state.exists() and not files.token.exists()
    assert "no client and no paused run for 1.5 s: exiting" in files.log.read_text()


def test_concurrent_first_connects_start_one_server(local_home, saved_models):
    clients: list = []
    errors: list = []

    def first() -> None:
        try:
            clients.append(djinn_nb.connect(model=saved_models["llama-tiny"], embedded=False))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=first) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len({c.address for c in clients}) == 1 and len(clients) == 3
    files, _ = only_server(local_home)
    assert files.log.read_text().count("djinn-server local: ") == 1, "one server started, two connects waited"


@pytest.mark.attack(cls="isolation", tried="a dead local server's port taken by another local user",
                    held="the client sends nothing there, its token least of all; a new server is started")
def test_a_stale_state_is_replaced(local_home, saved_models):
    path = saved_models["gpt2-tiny"]
    djinn_nb.connect(model=path, embedded=False).close()
    files, crashed = only_server(local_home)
    os.kill(crashed["pid"], signal.SIGKILL)  # a crash: the state file stays behind, its pid dead
    assert wait_gone(crashed["pid"], 10) and files.state.exists()
    client = djinn_nb.connect(model=path, embedded=False)
    _, second = only_server(local_home)
    assert second["pid"] != crashed["pid"] and client.address == f"127.0.0.1:{second['port']}"
    client.close()
    # the port is someone else's now (it hangs up on the hello), the pid alive: the hello decides
    imposter = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    accepted = []

    def hang_up() -> None:
        imposter.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(imposter.accept()[0].recv(65536))  # what a client would send it: its token
            except OSError:
                pass

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        localhome.write_private(files.state, json.dumps(dict(second, port=imposter.getsockname()[1])))
        client = djinn_nb.connect(model=path, embedded=False)
        _, third = only_server(local_home)
        assert third["pid"] not in (second["pid"], crashed["pid"]) and client.address.endswith(f":{third['port']}")
        assert client.generate(PROMPT, max_new_tokens=2).done
        client.close()
        assert accepted == []  # the port was not the server's: nothing, the token least of all, went there
    finally:
        stop.set()
        imposter.close()
        os.kill(second["pid"], signal.SIGTERM)  # its state was overwritten: nothing else would stop it


def test_files_are_private_and_lease_and_mode_are_checked(local_home, saved_models, monkeypatch):
    local_home.mkdir(mode=0o755)
    os.chmod(local_home, 0o755)
    client = djinn_nb.connect(model=saved_models["gpt2-tiny"], embedded=False)
    files, state = only_server(local_home)
    assert stat.S_IMODE(local_home.stat().st_mode) == 0o700
    for f in (files.state, files.token, files.lock, files.log):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert state["lease_seconds"] is None and client.address.startswith("127.0.0.1:")
    with pytest.raises(BadRequestError, match=r"runs with lease_seconds=None: `djinn-server stop` it first"):
        djinn_nb.connect(model=saved_models["gpt2-tiny"], embedded=False, lease_seconds=60)
    with pytest.raises(BadRequestError, match="not both"):
        djinn_nb.connect("127.0.0.1:1", embedded=False)
    monkeypatch.setenv("DJINN_LOCAL", "elsewhere")
    with pytest.raises(BadRequestError, match="DJINN_LOCAL must be 'embedded' or 'process'"):
        djinn_nb.connect(model=saved_models["gpt2-tiny"])
    # a wrong token is refused by the server: the token file is the key
    from djinn_nb.errors import AuthenticationError

    with pytest.raises(AuthenticationError):
        djinn_nb.connect(f"127.0.0.1:{state['port']}", token="not-the-token")
    # one server per (model, device, dtype): another model is another server, not a reload
    assert localhome.key(saved_models["gpt2-tiny"], "cpu", None) != localhome.key(saved_models["llama-tiny"], "cpu", None)
    assert localhome.key("random:gpt2-tiny", "cpu", None) != localhome.key("random:gpt2-tiny", "cpu", "bfloat16")


def test_status_and_stop(local_home, saved_models):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "djinn_nb.serving", *args], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)

    assert cli("status").stdout.startswith("no local djinn server")
    client = djinn_nb.connect(model="random:gpt2-tiny", embedded=False)
    client.generate(PROMPT, max_new_tokens=2, breakpoints=[1])
    _, state = only_server(local_home)
    time.sleep(1.5)  # the server notes its clients and runs within a second
    out = cli("status")
    assert out.returncode == 0 and f"random:gpt2-tiny on cpu: pid {state['pid']} at 127.0.0.1:{state['port']}" \
        in out.stdout and "1 clients, 1 runs (1 paused)" in out.stdout, out.stdout
    client.close()
    out = cli("stop")
    assert out.stdout.strip() == f"stopped random:gpt2-tiny (pid {state['pid']})"
    assert not localhome.pid_alive(state["pid"]) and localhome.servers(local_home) == []
    assert cli("stop").stdout.strip() == "no local djinn server was running"


def test_embedded_true_keeps_the_server_in_this_process(local_home, monkeypatch):
    monkeypatch.setenv("DJINN_LOCAL", "process")
    client = djinn_nb.connect(model="random:gpt2-tiny", embedded=True)
    from djinn_nb.client import connection

    assert any(s.port == int(client.address.rpartition(":")[2]) for s in connection._embedded.values())
    assert not local_home.exists() or localhome.servers(local_home) == []


def test_a_local_server_of_another_version_is_named_not_orphaned(local_home, saved_models, monkeypatch):
    """After an upgrade the running local server speaks another protocol: connect says so and how to
    stop it, and leaves it (and its paused runs) running rather than starting a second one beside it."""
    from djinn_nb.client import connection as conn_module
    from djinn_nb.errors import ProtocolError

    path = saved_models["gpt2-tiny"]
    old = djinn_nb.connect(model=path, embedded=False)
    kept = old.generate(PROMPT, max_new_tokens=4, breakpoints=[2])
    files, running = only_server(local_home)
    monkeypatch.setattr(conn_module, "PROTOCOL", conn_module.PROTOCOL + 1)  # this client: a newer djinn_nb
    with pytest.raises(ProtocolError, match=rf"the local server \(pid {running['pid']}, .*`djinn-server stop`"):
        djinn_nb.connect(model=path, embedded=False)
    monkeypatch.undo()
    _, still = only_server(local_home)
    assert still["pid"] == running["pid"] and kept.refresh().paused
    old.close()


@pytest.mark.attack(cls="door", tried="a failed hello to a live local server (a flood of others' sockets, a slow machine)",
                    held="an error to retry; the server and its paused runs are kept, no second server")
def test_a_live_local_server_whose_hello_fails_once_is_kept_not_orphaned(local_home, saved_models, monkeypatch):
    """A hello that fails (a slow machine, a flood of other local users' sockets) against the live
    server on its own port is an error to retry, never a reason to start a second server beside it."""
    from djinn_nb.client import local

    path = saved_models["gpt2-tiny"]
    client = djinn_nb.connect(model=path, embedded=False)
    kept = client.generate(PROMPT, max_new_tokens=4, breakpoints=[2])
    _, running = only_server(local_home)
    real = local._reach

    def failing_hello(files, open_client, must=False):
        def refuse(port, token):
            raise ConnectionResetError("the hello was dropped")
        return real(files, refuse, must)

    monkeypatch.setattr(local, "_reach", failing_hello)
    with pytest.raises(DjinnError, match=rf"the local server \(pid {running['pid']}\) .* did not answer"):
        djinn_nb.connect(model=path, embedded=False)
    monkeypatch.undo()
    assert [state["pid"] for _, state in localhome.servers(local_home)] == [running["pid"]]
    assert kept.refresh().paused
    client.close()
