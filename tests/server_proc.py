"""Real ``djinn-server`` processes on loopback, for the users, TLS, scheduling and attack tests.

One shared server (a random GPT-2 512 wide, so a 600-token activation is over 1 MiB)
serves every test that does not need a special configuration: TLS with a self-signed
certificate made here with ``openssl``, a users file with alice, bob, carol and an admin.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import djinn_nb
from djinn_nb.serving.users import add_user

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServerProc:
    proc: subprocess.Popen
    port: int
    log: Path
    tokens: dict[str, str] = field(default_factory=dict)
    ca: str | None = None
    files: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def connect(self, user: str, **kw: Any) -> djinn_nb.Client:
        kw.setdefault("tls_ca", self.ca)
        return djinn_nb.connect(self.address, token=self.tokens[user], **kw)

    def rss(self) -> int:
        """Resident set size of the server process, bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def start(args: list[str], workdir: Path, preexec: Callable[[], None] | None = None, timeout: float = 180,
          env_extra: dict[str, str] | None = None) -> ServerProc:
    """Start ``python -m djinn_nb.serving --port 0 ARGS`` (environment plus ``env_extra``) and wait
    for its address line."""
    log = workdir / f"server-{len(list(workdir.glob('server-*.log')))}.log"
    env = {k: v for k, v in os.environ.items() if k != "DJINN_TOKEN"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "djinn_nb.serving", "--port", "0", *args], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True, preexec_fn=preexec)
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r" at 127\.0\.0\.1:(\d+)", line)
        if m:
            return ServerProc(proc, int(m.group(1)), log)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"djinn-server did not start: {line!r}\n{log.read_text()[-3000:]}")


def save_model(directory: Path) -> str:
    """A random GPT-2 of 4 blocks, 512 wide and 1024 positions: a 600-token activation is over 1 MiB
    and a step takes milliseconds on a CPU."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    cfg = GPT2Config(n_layer=4, n_embd=512, n_head=8, vocab_size=512, n_positions=1024, initializer_range=0.05,
                     bos_token_id=None, eos_token_id=None)
    path = directory / "gpt2-wide"
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    return str(path)


def make_cert(directory: Path, name: str) -> tuple[str, str]:
    """A self-signed certificate for localhost and 127.0.0.1 (its own CA)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def lab_server(model: str | None = None, device: str = "cpu") -> Iterator[ServerProc]:
    """The shared server: a 4-block GPT-2 (``save_model``), TLS, users alice (max_runs 3), bob, carol (max_paused_bytes 1000), root (admin)."""
    workdir = Path(tempfile.mkdtemp(prefix="djinn-lab-"))
    cert, key = make_cert(workdir, "server")
    users = workdir / "users.yaml"
    out = subprocess.run([sys.executable, "-m", "djinn_nb.serving", "add-user", "alice", "--users", str(users),
                          "--max-runs", "3"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    tokens = {"alice": out.stdout.strip()}
    tokens["bob"] = add_user(users, "bob")
    tokens["carol"] = add_user(users, "carol", max_paused_bytes=1000)
    tokens["root"] = add_user(users, "root", admin=True)
    model = model or save_model(workdir)
    server = start(["--model", model, "--device", device, "--users", str(users), "--tls-cert", cert, "--tls-key", key], workdir)
    server.tokens, server.ca, server.files = tokens, cert, workdir
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def lab():
    """The shared server (see ``lab_server``)."""
    yield from lab_server()
