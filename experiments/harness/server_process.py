"""A ``djinn-server`` in a child process for the benchmarks that time calls through the client.

    with djinn_server("random:gpt2", "cuda:0") as address:
        client = djinn_nb.connect(address)

The server loads the model itself (the same random weights the benchmark builds in-process for
its baselines) and is killed when the block ends.
"""
from __future__ import annotations

import subprocess
import tempfile
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def djinn_server(model: str, device: str, dtype: str | None = None) -> Iterator[str]:
    """Start ``python -m djinn_nb.serving`` on a free loopback port; yields ``"host:port"``."""
    cmd = [sys.executable, "-m", "djinn_nb.serving", "--model", model, "--device", device, "--port", "0"]
    if dtype:
        cmd += ["--dtype", dtype]
    err = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
    try:
        line = server.stdout.readline() if server.stdout is not None else ""
        if " at " not in line:
            server.wait(10)
            err.seek(0)
            raise RuntimeError(f"djinn-server did not start: {line!r}\n{err.read()[-3000:]}")
        yield line.rsplit(" at ", 1)[1].strip()
    finally:
        server.kill()
        server.wait()
