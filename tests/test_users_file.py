"""The users file and the door: names, file modes, atomic writes, reload by SIGHUP, and a
throttle that never refuses a correct token — against real ``djinn-server`` processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import djinn_nb
from djinn_nb.errors import AuthenticationError, BadRequestError
from djinn_nb.serving.users import Authenticator, User, add_user, digest, load_users
from server_proc import ROOT, start

PROMPT = [5, 17, 42, 99, 3, 250, 11, 7]


@pytest.mark.attack(cls="users file", tried="8 odd user names (empty, spaces, a newline, ../etc, -flag, 65 characters)", held="each refused, nothing written; josé kept")
def test_add_user_refuses_odd_names_and_keeps_non_ascii_ones(tmp_path):
    users = tmp_path / "users.yaml"
    for bad in ("", " alice", "a b", "x" * 65, "ann\n", "../etc", "-flag", "a:b"):
        with pytest.raises(BadRequestError, match="user name"):
            add_user(users, bad)
    assert not users.exists()  # nothing written for a refused name
    token = add_user(users, "josé")
    assert load_users(users)["josé"].token_sha256 == digest(token)
    assert os.stat(users).st_mode & 0o777 == 0o600


@pytest.mark.attack(cls="users file", tried="symlinks planted at the temporary names add-user could use", held="never followed (mkstemp + rename)")
def test_add_user_never_follows_a_planted_temporary_file(tmp_path):
    users = tmp_path / "users.yaml"
    add_user(users, "ann")
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    for name in ("users.yaml.tmp", ".users.yaml.tmp"):
        (tmp_path / name).symlink_to(victim)
    add_user(users, "ben")
    assert victim.read_text() == "untouched"
    assert set(load_users(users)) == {"ann", "ben"}


@pytest.mark.attack(cls="users file", tried="a users file writable by group or others", held="refused at load")
def test_a_users_file_others_can_write_is_refused(tmp_path):
    users = tmp_path / "users.yaml"
    add_user(users, "ann")
    os.chmod(users, 0o666)
    with pytest.raises(BadRequestError, match="writable by others.*chmod 600"):
        load_users(users)
    out = subprocess.run([sys.executable, "-m", "djinn_nb.serving", "--model", "random:gpt2-tiny", "--users",
                          str(users), "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "writable by others" in out.stderr


@pytest.mark.attack(cls="users file", tried="no token against an all-zero digest entry", held="matches nothing")
def test_a_missing_token_matches_no_entry_not_even_an_all_zero_digest():
    auth = Authenticator({"z": User("z", b"\0" * 32)}, limit=100)
    for token in (None, "", 0, b""):
        with pytest.raises(AuthenticationError, match="wrong or missing token"):
            auth.authenticate(token, "1.2.3.4")


@pytest.mark.attack(cls="door", tried="wrong hellos locking out a shared address (an SSH tunnel)", held="a correct token is never refused")
def test_the_throttle_never_refuses_a_correct_token():
    auth = Authenticator({"ann": User("ann", digest("right"))}, limit=3)
    for _ in range(3):
        with pytest.raises(AuthenticationError, match="wrong or missing"):
            auth.authenticate("wrong", "127.0.0.1")
    with pytest.raises(AuthenticationError, match="too many failed"):
        auth.authenticate("wrong", "127.0.0.1")
    assert auth.authenticate("right", "127.0.0.1").name == "ann"  # same address, e.g. an SSH tunnel


@pytest.mark.attack(cls="users file", tried="a leaked token revoked by SIGHUP", held="its connections refused at their next call; every run kept")
def test_sighup_reloads_the_users_file_revoking_a_token_and_keeping_everyones_runs():
    workdir = Path(tempfile.mkdtemp(prefix="djinn-reload-"))
    users = workdir / "users.yaml"
    tokens = {name: add_user(users, name) for name in ("ann", "ben")}
    server = start(["--model", "random:gpt2-tiny", "--users", str(users)], workdir)
    try:
        ann = djinn_nb.connect(server.address, token=tokens["ann"])
        ben = djinn_nb.connect(server.address, token=tokens["ben"])
        kept = ann.generate(PROMPT, max_new_tokens=4, breakpoints=[2])
        ben_run = ben.generate(PROMPT, max_new_tokens=4, breakpoints=[2])
        # ben's token leaked: rewrite the file without him, as an admin would, then SIGHUP
        fresh = workdir / "fresh.yaml"
        new_ann = add_user(fresh, "ann")
        add_user(fresh, "cat")
        os.replace(fresh, users)
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "users file reloaded: 2 users" not in server.log.read_text():
            assert time.monotonic() < deadline and server.alive(), server.log.read_text()[-2000:]
            time.sleep(0.1)
        with pytest.raises(AuthenticationError, match="no longer accepts your token"):
            ben_run.resume()
        with pytest.raises(AuthenticationError, match="no longer accepts your token"):
            ann.runs()  # ann's token changed too: her open connection is refused as well
        with pytest.raises(AuthenticationError):
            djinn_nb.connect(server.address, token=tokens["ben"])
        again = djinn_nb.connect(server.address, token=new_ann)
        assert [r["id"] for r in again.runs()] == [kept.id]  # her runs are where she left them
        assert again.attach(kept.id).resume().token_ids == djinn_nb.connect(
            server.address, token=new_ann).generate(PROMPT, max_new_tokens=4).token_ids
        # a file that does not load keeps the users as they were
        users.write_text("users: [")
        os.chmod(users, 0o600)
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "users file not reloaded" not in server.log.read_text():
            assert time.monotonic() < deadline and server.alive()
            time.sleep(0.1)
        assert len(djinn_nb.connect(server.address, token=new_ann).runs()) == 2  # still ann's token
    finally:
        server.stop()


@pytest.mark.attack(cls="users file", tried="SIGHUP to a server with no users file", held="the server serves on")
def test_sighup_without_a_users_file_does_not_end_the_server():
    workdir = Path(tempfile.mkdtemp(prefix="djinn-hup-"))
    server = start(["--model", "random:gpt2-tiny"], workdir)
    try:
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert server.alive()
        assert djinn_nb.connect(server.address).generate(PROMPT, max_new_tokens=2).done
    finally:
        server.stop()


@pytest.mark.attack(cls="users file", tried="an upload by user \"josé\"", held="goes through (was an internal error)")
def test_a_user_with_a_non_ascii_name_uploads_on_the_side_channel(monkeypatch):
    from djinn_nb.wire import sidechannel

    workdir = Path(tempfile.mkdtemp(prefix="djinn-josé-"))
    users = workdir / "users.yaml"
    token = add_user(users, "josé")
    server = start(["--model", "random:gpt2-tiny", "--users", str(users)], workdir)
    try:
        client = djinn_nb.connect(server.address, token=token)
        run = client.generate(PROMPT, max_new_tokens=3, breakpoints=[1])
        monkeypatch.setattr(sidechannel, "BULK_THRESHOLD", 0)  # every tensor by ticket (was an internal error)
        edited = run.fork(add=torch.ones(64), breakpoints=[])
        monkeypatch.undo()
        assert edited.token_ids == run.fork(add=torch.ones(64), breakpoints=[]).token_ids
    finally:
        server.stop()


@pytest.mark.attack(cls="isolation", tried="one user opening every connection after a reload added users", held="refused at half of max_connections; shares recomputed")
def test_a_reload_that_adds_users_gives_each_their_share_and_one_user_cannot_hold_every_connection():
    workdir = Path(tempfile.mkdtemp(prefix="djinn-share-"))
    users = workdir / "users.yaml"
    tokens = {"ann": add_user(users, "ann")}
    server = start(["--model", "random:gpt2-tiny", "--users", str(users), "--max-held-bytes", "3000000",
                    "--max-connections", "8"], workdir)
    try:
        tokens["ben"] = add_user(users, "ben")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "users file reloaded: 2 users" not in server.log.read_text():
            assert time.monotonic() < deadline and server.alive()
            time.sleep(0.1)
        line = [x for x in server.log.read_text().splitlines() if "users file reloaded" in x][-1]
        assert "user_max_held_bytes 1.5 MB (half of max_held_bytes: 2 users share it)" in line
        assert "user_max_connections 4 (half of max_connections)" in line
        ann = [djinn_nb.connect(server.address, token=tokens["ann"]) for _ in range(4)]
        with pytest.raises(Exception, match="user_max_connections: you have 4 connections open, of 4"):
            djinn_nb.connect(server.address, token=tokens["ann"])
        ben = djinn_nb.connect(server.address, token=tokens["ben"])  # his slots are his
        with pytest.raises(Exception, match="quota user_max_held_bytes"):
            for _ in range(40):
                ann[0].generate([i % 500 for i in range(40)], max_new_tokens=40, breakpoints=[(6, 30)])
        assert ben.generate(PROMPT, max_new_tokens=4, breakpoints=[2]).paused
        ann[3].close()
        time.sleep(0.3)
        djinn_nb.connect(server.address, token=tokens["ann"]).close()  # a closed connection gives its slot back
    finally:
        server.stop()
