"""A server started with no limit flags is bounded, says how at start-up, and admits before allocating.

Against real ``djinn-server`` processes on loopback (a tiny random GPT-2: 6,144 bytes of KV cache per
position in float32), as tests/test_attacks.py does.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import torch

import djinn_nb
from djinn_nb.errors import QuotaError
from djinn_nb.serving.limits import Memory, derive_limits, kv_bytes_per_position, parse_bytes
from djinn_nb.serving.users import add_user
from server_proc import start

PROMPT = [5, 17, 42, 99, 3, 250, 11, 7]
TOKEN = "defaults-token"
KV_PER_POSITION = 2 * 12 * 64 * 4  # gpt2-tiny: K and V, 12 layers, 64 wide, float32


def _limits_line(server) -> str:
    line = server.proc.stdout.readline()  # printed right after the address line
    assert line.startswith("djinn-server: limits: "), line
    return line


@pytest.fixture(scope="module")
def plain():
    """A server given no limit flags at all."""
    server = start(["--model", "random:gpt2-tiny"], Path(tempfile.mkdtemp(prefix="djinn-defaults-")),
                   env_extra={"DJINN_TOKEN": TOKEN})
    server.limits_line = _limits_line(server)
    yield server
    server.stop()


def test_a_server_with_no_flags_states_its_limits_at_start_up(plain):
    line = plain.limits_line
    held = re.search(r"max_held_bytes ([\d.]+) (GB|MB) \(50% of ([\d.]+) (GB|MB) available host memory\)", line)
    assert held, line
    assert "user_max_runs 256 (default)" in line
    assert "max_call_steps 256 (the model's positions)" in line
    assert "user_max_held_bytes none (one user: max_held_bytes bounds it)" in line
    assert "max_call_seconds 600" in line


@pytest.mark.attack(cls="defaults", tried="257 runs and a 257-step call on a server started with no flags", held="the 257th run and the call refused, nothing made")
def test_a_server_with_no_flags_bounds_a_users_runs_and_a_calls_steps(plain):
    client = djinn_nb.connect(plain.address, token=TOKEN)
    try:
        with pytest.raises(QuotaError, match=r"quota max_call_steps: a call may run at most 256 steps"):
            client.generate(PROMPT, max_new_tokens=257)
        runs = [client.generate(PROMPT, max_new_tokens=2, breakpoints=[0]) for _ in range(256)]
        with pytest.raises(QuotaError, match=r"quota max_runs: you hold 256 of 256 runs; close some first"):
            client.generate(PROMPT, max_new_tokens=2)
        with pytest.raises(QuotaError, match=r"quota max_runs: you hold 256 of 256 runs"):
            runs[0].fork(scale=2.0)
        assert len(client.runs()) == 256  # nothing was made
        runs[0].close()
        assert client.generate(PROMPT, max_new_tokens=2).done  # room again
    finally:
        for r in client.runs():
            client.attach(r["id"]).close()
        client.close()


@pytest.fixture(scope="module")
def shared():
    """Two users, 4 MB for all runs: each user's default share is half of it."""
    workdir = Path(tempfile.mkdtemp(prefix="djinn-shared-"))
    users = workdir / "users.yaml"
    tokens = {name: add_user(users, name) for name in ("ann", "ben")}
    server = start(["--model", "random:gpt2-tiny", "--users", str(users), "--max-held-bytes", "4000000"], workdir)
    server.tokens = tokens
    server.limits_line = _limits_line(server)
    yield server
    server.stop()


@pytest.mark.attack(cls="admission", tried="fork_many of 63 forks (18.6 MB) over a 2 MB share", held="refused before any fork exists")
def test_fork_many_is_admitted_on_its_estimate_before_any_fork_exists(shared):
    assert "user_max_held_bytes 2.0 MB (half of max_held_bytes: 2 users share it)" in shared.limits_line
    ann = shared.connect("ann", tls_ca=None)
    try:
        parent = ann.generate(PROMPT, max_new_tokens=40, breakpoints=[(6, 0)])
        before = sorted(r["id"] for r in ann.runs())
        # 63 forks x 48 positions x 6,144 bytes = 18.6 MB, over ann's 2 MB: refused before any fork runs
        with pytest.raises(QuotaError, match=r"quota user_max_held_bytes: your runs hold \d+ bytes and this call "
                                             r"would add about 18579456, over your 2000000"):
            parent.fork_many([{"scale": 1.0 + i / 64, "breakpoints": []} for i in range(63)])
        assert sorted(r["id"] for r in ann.runs()) == before
        forks = parent.fork_many([{"scale": s, "breakpoints": []} for s in (0.5, 2.0)])  # 0.6 MB: fits
        assert [f.done for f in forks] == [True, True]
    finally:
        for r in ann.runs():
            ann.attach(r["id"]).close()
        ann.close()


@pytest.mark.attack(cls="isolation", tried="one user generating until refused", held="the other user's share is untouched; run ids reveal nothing of her")
def test_one_user_cannot_take_another_users_share_nor_learn_of_their_activity(shared):
    ann, ben = shared.connect("ann", tls_ca=None), shared.connect("ben", tls_ca=None)
    try:
        kept = []
        with pytest.raises(QuotaError, match="quota user_max_held_bytes: your runs hold"):
            for _ in range(40):  # each keeps 70 positions (0.43 MB) and is admitted on 80 (0.49 MB)
                kept.append(ann.generate([i % 500 for i in range(40)], max_new_tokens=40, breakpoints=[(6, 30)]))
        assert 3 <= len(kept) < 40
        mine = ben.generate(PROMPT, max_new_tokens=4, breakpoints=[2])  # ben's half is his
        assert re.fullmatch(r"r1-[0-9a-f]{8}", mine.id)  # his first run: ann's runs are not counted in it
        assert ben.generate(PROMPT, max_new_tokens=4).done
    finally:
        for client in (ann, ben):
            for r in client.runs():
                client.attach(r["id"]).close()
            client.close()


@pytest.mark.attack(cls="counting", tried="one user reserving side-channel slots until refused", held="the other user's upload goes through")
def test_one_users_reservations_cannot_deny_another_users_uploads(shared):
    """Side-channel reservations count to their user's bytes: ann reserving all she may (2 MB)
    leaves ben his own share, and his upload goes through."""
    from djinn_nb import wire
    from djinn_nb.wire import sidechannel

    ann, ben = shared.connect("ann", tls_ca=None), shared.connect("ben", tls_ca=None)
    try:
        header = wire.dumps({"dtype": "float32", "shape": [120_000]})  # 0.48 MB
        with pytest.raises(QuotaError, match="quota user_max_held_bytes"):
            for _ in range(100):
                ann._call("expect", header)
        up = ben._call("expect", header)
        sidechannel.push("127.0.0.1", up, torch.ones(120_000))
    finally:
        ann.close()  # its reservations go with its connection
        ben.close()


@pytest.mark.attack(cls="leaks", tried="a refusal by the server-wide cap", held="states no byte counts of other users")
def test_refusals_by_the_servers_total_do_not_state_other_users_holdings():
    workdir = Path(tempfile.mkdtemp(prefix="djinn-total-"))
    users = workdir / "users.yaml"
    tokens = {name: add_user(users, name) for name in ("ann", "ben")}
    server = start(["--model", "random:gpt2-tiny", "--users", str(users), "--max-held-bytes", "1000000",
                    "--user-max-held-bytes", "none"], workdir)
    try:  # the server stops whatever fails, connecting included
        ann = djinn_nb.connect(server.address, token=tokens["ann"])
        ben = djinn_nb.connect(server.address, token=tokens["ben"])
        ann.generate([i % 500 for i in range(100)], max_new_tokens=40, breakpoints=[(6, 30)])  # 0.8 MB kept
        with pytest.raises(QuotaError, match="max_held_bytes") as refused:
            ben.generate(PROMPT, max_new_tokens=40, breakpoints=[2])  # admitted on 48 positions: 0.3 MB
        assert not re.search(r"\d{4,}", str(refused.value)), str(refused.value)  # no byte counts of others
        ann.close()
        ben.close()
    finally:
        server.stop()


# ----- the derivation itself --------------------------------------------------------------
def test_defaults_derive_from_the_machine_and_flags_override_them():
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    mem = Memory(host_available=20 << 30)
    one = derive_limits({}, device=cpu, max_positions=1024, users=1, memory=mem)
    assert (one.max_held_bytes, one.user_max_held_bytes, one.user_max_runs, one.max_call_steps) == (
        10 << 30, None, 256, 1024)
    embedded = derive_limits({}, device=cpu, max_positions=None, users=0, embedded=True, memory=mem)
    assert (embedded.max_held_bytes, embedded.user_max_runs, embedded.max_call_steps) == (15 << 30, 4096, 8192)
    gpu = derive_limits({}, device=cuda, max_positions=4096, users=3, memory=Memory(20 << 30, device_free=100 << 30))
    assert gpu.max_held_bytes == int(0.8 * (100 << 30) + 0.25 * (20 << 30))
    assert gpu.user_max_held_bytes == gpu.max_held_bytes // 2
    assert "80% of" in gpu.describe() and "free on cuda:0" in gpu.describe()
    given = derive_limits({"max_held_bytes": None, "user_max_runs": 3}, device=cpu, max_positions=8, users=2, memory=mem)
    assert (given.max_held_bytes, given.user_max_held_bytes, given.user_max_runs) == (None, None, 3)
    assert "max_held_bytes none," in given.describe()


def test_sizes_parse_with_units_and_none():
    assert parse_bytes("2000000") == 2000000
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("8GiB") == 8 << 30 and parse_bytes("1.5k") == 1536
    assert parse_bytes("none") is None
    for bad in ("", "-1", "0", "8X", "1e9"):
        with pytest.raises(ValueError, match="a size"):
            parse_bytes(bad)


def test_the_kv_estimate_matches_what_a_cache_holds():
    from djinn_nb.core.engine import Engine
    from djinn_nb.core.models import build_random

    for name in ("gpt2-tiny", "llama-tiny", "qwen2-tiny", "neox-tiny"):
        model = build_random(name, seed=0)
        engine = Engine(model, None, name)
        run = engine.generate(PROMPT, 5, [(engine.num_layers - 1, 3)])  # after step 3's last block: 8 + 3 positions
        per = kv_bytes_per_position(model.config, engine.dtype)
        cache = sum(t.numel() * t.element_size() for layer in run.cache.layers for t in (layer.keys, layer.values))
        assert cache == per * (len(PROMPT) + 3), (name, cache, per)
    assert KV_PER_POSITION == kv_bytes_per_position(build_random("gpt2-tiny", seed=0).config, torch.float32)
