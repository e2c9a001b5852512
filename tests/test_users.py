"""Users of one server (a real ``djinn-server --users`` process): isolation, quotas, the admin, tokens."""
from __future__ import annotations

import hashlib

import pytest
import yaml

from djinn_nb.errors import AuthenticationError, QuotaError, UnknownRunError

PROMPT = [5, 17, 42, 99, 3, 250, 11, 7]


def _unknown_message(client, run_id: str) -> str:
    with pytest.raises(UnknownRunError) as e:
        client.attach(run_id)
    return str(e.value).replace(run_id, "<id>")


@pytest.mark.attack(cls="isolation", tried="two users reaching for each other's runs", held="neither sees nor touches the other's")
def test_two_users_cannot_see_or_touch_each_others_runs(lab):
    alice, bob = lab.connect("alice"), lab.connect("bob")
    try:
        run = alice.generate(PROMPT, max_new_tokens=4, breakpoints=[2])
        reference = alice.generate(PROMPT, max_new_tokens=4)
        assert run.id not in {r["id"] for r in bob.runs()}
        unknown = _unknown_message(bob, "r999999-00000000")
        assert _unknown_message(bob, run.id) == unknown  # exactly like an id that does not exist
        handle = alice.attach(run.id)
        handle._client = bob  # bob holds a handle with alice's id: every call is refused the same way
        for attempt in (handle.activation, handle.resume, lambda: handle.fork(scale=2.0), handle.close,
                        handle.refresh):
            with pytest.raises(UnknownRunError):
                attempt()
        assert run.refresh().paused and (run.layer, run.step) == (2, 0)
        assert run.resume().token_ids == reference.token_ids
    finally:
        for r in alice.runs():
            alice.attach(r["id"]).close()
        alice.close()
        bob.close()


def test_admin_lists_every_run_and_closes_any(lab):
    alice, root = lab.connect("alice"), lab.connect("root")
    try:
        run = alice.generate(PROMPT, max_new_tokens=4, breakpoints=[1])
        assert run.id in {r["id"] for r in root.runs()}
        handle = alice.attach(run.id)
        handle._client = root
        handle.close()
        with pytest.raises(UnknownRunError):
            alice.attach(run.id)
    finally:
        for r in alice.runs():
            alice.attach(r["id"]).close()
        alice.close()
        root.close()


@pytest.mark.attack(cls="admission", tried="a call over a user's run quota", held="refused by name, nothing changed")
def test_quota_refusal_names_the_quota_and_changes_nothing(lab):
    alice, bob = lab.connect("alice"), lab.connect("bob")
    try:
        for r in alice.runs():
            alice.attach(r["id"]).close()
        held = [alice.generate(PROMPT, max_new_tokens=4, breakpoints=[3]) for _ in range(3)]  # max_runs: 3
        before = sorted(r["id"] for r in alice.runs())
        with pytest.raises(QuotaError, match="max_runs"):
            alice.generate(PROMPT, max_new_tokens=4)
        with pytest.raises(QuotaError, match="max_runs"):
            held[0].fork(scale=0.5)
        assert sorted(r["id"] for r in alice.runs()) == before
        assert all(h.refresh().paused and (h.layer, h.step) == (3, 0) for h in held)
        other = bob.generate(PROMPT, max_new_tokens=4)  # bob is not affected
        assert held[0].resume().token_ids == other.token_ids
    finally:
        for r in alice.runs():
            alice.attach(r["id"]).close()
        alice.close()
        bob.close()


@pytest.mark.attack(cls="admission", tried="a run that would hold more than the user's bytes", held="refused before allocating")
def test_byte_quota_refuses_a_run_that_would_hold_too_much(lab):
    carol = lab.connect("carol")  # max_paused_bytes: 1000, less than any paused run holds
    try:
        with pytest.raises(QuotaError, match="max_paused_bytes"):
            carol.generate(PROMPT, max_new_tokens=4, breakpoints=[1])
        assert carol.runs() == []  # the refused run is gone, not left half-made
        with pytest.raises(QuotaError, match="max_paused_bytes"):
            carol.generate(PROMPT, max_new_tokens=2)
        assert carol.runs() == []
    finally:
        carol.close()


@pytest.mark.parametrize("token", ["not-a-user", "", None])
def test_unknown_token_is_refused(lab, token):
    import djinn_nb

    with pytest.raises(AuthenticationError, match="token"):
        djinn_nb.connect(lab.address, token=token, tls_ca=lab.ca)


def test_users_file_holds_only_digests(lab):
    data = yaml.safe_load((lab.files / "users.yaml").read_text())["users"]
    assert set(data) == {"alice", "bob", "carol", "root"}
    for name, spec in data.items():
        assert spec["token_sha256"] == hashlib.sha256(lab.tokens[name].encode()).hexdigest()
        assert lab.tokens[name] not in (lab.files / "users.yaml").read_text()
    assert data["alice"]["max_runs"] == 3 and data["root"]["admin"] is True
    assert (lab.files / "users.yaml").stat().st_mode & 0o077 == 0
