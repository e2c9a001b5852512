"""CPU threads: idle OpenMP threads wait passively by default (a busy 2-core machine was 8-25x slower
with them spinning), DJINN_THREADS and OMP_WAIT_POLICY override, and client.info() says what is in effect.
Each case is a fresh process, since libgomp reads its policy once, when torch loads it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = ("import json, os, sys\n"
         "{pre}\n"
         "import djinn_nb\n"
         "client = djinn_nb.connect(model='random:gpt2-tiny', embedded=True)  # this process's threads\n"
         "info = client.info\n"
         "print('INFO', json.dumps({{'env': os.environ.get('OMP_WAIT_POLICY'), 'threads': info['threads'],\n"
         "                          'policy': info['omp_wait_policy']}}))\n")


def probe(env: dict[str, str], pre: str = "") -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "DJINN_THREADS")}
    p = subprocess.run([sys.executable, "-c", PROBE.format(pre=pre)], env={**base, **env}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.split("INFO ", 1)[1])


def test_importing_djinn_nb_makes_idle_threads_wait_passively():
    out = probe({})
    assert out["env"] == "PASSIVE" and out["policy"] == "PASSIVE"
    assert out["threads"] >= 1


def test_a_users_choice_of_policy_and_thread_count_is_kept_and_reported():
    out = probe({"OMP_WAIT_POLICY": "ACTIVE", "DJINN_THREADS": "1"})
    assert out == {"env": "ACTIVE", "threads": 1, "policy": "ACTIVE"}


def test_torch_imported_first_is_reported_not_hidden():
    out = probe({}, pre="import torch")
    assert out["env"] is None and "torch was imported before djinn_nb" in out["policy"]


@pytest.mark.parametrize("bad", ["0", "two", "-1"])
def test_a_bad_thread_count_is_refused_by_name(bad, monkeypatch):
    from djinn_nb.core.threads import thread_setting
    from djinn_nb.errors import BadRequestError

    monkeypatch.setenv("DJINN_THREADS", bad)
    with pytest.raises(BadRequestError, match="DJINN_THREADS must be a positive integer"):
        thread_setting()
