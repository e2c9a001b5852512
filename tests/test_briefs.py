"""Run briefs: steps and forks answer where the run is and only the token ids the client lacks;
details (statistics, top-k, bytes held) come on demand and are asked for again only after a change.

Every check is against what the server's engine holds, or against plain HF generate."""
from __future__ import annotations

import pytest
import torch

import djinn_nb
from djinn_nb.errors import BadRequestError, ProtocolError
from djinn_nb.wire.messages import RunBrief
from djinn_nb import wire

from serving import NEW_TOKENS, PROMPT, raw_connection, reply, serve


@pytest.fixture(scope="module")
def served():
    s = serve()
    yield s
    s.server.close()


@pytest.fixture()
def client(served):
    c = djinn_nb.connect(f"127.0.0.1:{served.port}")
    yield c
    for r in c.runs():
        c.attach(r["id"]).close()
    c.close()


def _server_tokens(served, run) -> list[int]:
    return list(served.engine.get(run.id).token_ids)


def _count_calls(client, name: str) -> list[int]:
    """A counter of the client's calls of ``exposed_<name>`` (the real call still goes through)."""
    seen = [0]
    real = client._remote(name)

    def counted(*args):
        seen[0] += 1
        return real(*args)

    client._methods[name] = counted
    return seen


def test_stepping_every_step_by_briefs_gives_the_reference_tokens(served, client):
    run = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, breakpoints=[(3, "all")])
    while run.paused:
        assert run.token_ids == _server_tokens(served, run)
        run.resume()
    assert run.done and run.token_ids == served.reference == _server_tokens(served, run)


def test_a_stale_handle_forks_and_rewinds_with_the_right_tokens(served, client):
    run = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, breakpoints=[(3, "all")])
    stale = client.attach(run.id)  # a second handle that stays at step 0 while the first moves on
    for _ in range(3):
        run.resume()
    assert stale.token_ids == [] and len(run.token_ids) == 3
    fork = stale.fork(breakpoints=[])  # forks where the run is now (step 3), not where the handle saw it
    assert fork.token_ids == served.reference
    back = stale.rewind(step=2)
    assert back.token_ids == served.reference[:2] == _server_tokens(served, back)
    many = stale.fork_many([{"breakpoints": []}, {"scale": 1.0, "breakpoints": []}])
    assert [m.token_ids for m in many] == [served.reference] * 2
    assert stale.refresh().token_ids == run.token_ids == served.reference[:3]


def test_details_come_on_demand_and_are_not_asked_twice(served, client):
    run = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, breakpoints=[(3, "all")])
    summaries = _count_calls(client, "summary")
    run.resume()
    assert summaries[0] == 0  # a step answers a brief only
    act = run.activation()
    stats = run.activation_stats
    assert summaries[0] == 1
    assert stats["norm"] == pytest.approx(float(act.float().norm()), rel=1e-5)
    assert stats["shape"] == list(act.shape)
    assert run.bytes_held == served.engine.get(run.id).bytes_held() > 0
    assert run.topk[0][0] == served.reference[1] and run.breakpoints
    assert summaries[0] == 1  # the same version: read once
    run.edit(scale=0.5)
    assert run.activation_stats["norm"] == pytest.approx(0.5 * stats["norm"], rel=1e-5)
    assert summaries[0] == 2


def test_bytes_held_follows_every_change(served, client):
    run = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, breakpoints=[(3, "all")])
    server_run = served.engine.get(run.id)
    sizes = [run.bytes_held]
    run.resume()
    sizes.append(run.bytes_held)
    assert sizes[1] > sizes[0]  # one more step of KV cache
    assert server_run.bytes_held() == server_run._count_bytes()[0] == sizes[1]
    run.offload()
    assert run.offloaded and run.bytes_held == server_run._count_bytes()[0]
    rows = {r["id"]: r for r in client.runs()}
    assert rows[run.id]["bytes_held"] == server_run._count_bytes()[0] and rows[run.id]["offloaded"]
    run.close()
    assert server_run.bytes_held() == 0


def test_a_bad_since_is_refused_and_changes_nothing(served):
    conn = raw_connection(served.port)
    run = reply(conn.root.generate(wire.dumps({"prompt": PROMPT, "max_new_tokens": 3, "breakpoints": [3]})))["result"]
    for bad in (-1, 1.5, "3", True):
        msg = reply(conn.root.resume(run["id"], bad))
        assert msg["error"]["kind"] == "BadRequestError" and "since" in msg["error"]["message"]
    assert served.engine.get(run["id"]).step == 0 and served.engine.get(run["id"]).paused
    brief = reply(conn.root.status(run["id"], 99))["result"]
    assert brief["keep"] == 0 and brief["tokens"] == [] and brief["state"] == "paused"
    served.engine.close(run["id"])
    conn.close()


@pytest.mark.parametrize("change, message", [
    (lambda b: {**b, "tokens": [1, "2"]}, "tokens"),
    (lambda b: {**b, "keep": -1}, "keep"),
    (lambda b: {**b, "state": "sleeping"}, "state"),
    (lambda b: {**b, "extra": 1}, "fields"),
    (lambda b: {k: v for k, v in b.items() if k != "v"}, "fields"),
    (lambda b: {**b, "layer": "3"}, "layer"),
    (lambda b: {**b, "timings_ms": [1.0]}, "timings_ms"),
    (lambda b: {**b, "timings_ms": {"execute": "1"}}, "timings_ms"),
    (lambda b: {**b, "timings_ms": {str(i): 1.0 for i in range(17)}}, "timings_ms"),
])
def test_a_malformed_brief_is_refused(change, message):
    good = {"id": "r1-ab", "state": "paused", "step": 2, "layer": 3, "site": "resid_post", "keep": 1,
            "tokens": [4, 5], "max_new_tokens": 6, "parent": None, "offloaded": False, "error": None, "v": 7,
            "timings_ms": {"execute": 1.5}}
    assert RunBrief.from_json(good).tokens == [4, 5]
    with pytest.raises(BadRequestError, match=message):
        RunBrief.from_json(change(good))


def test_a_forks_server_timings_come_with_its_reply_and_outlive_it(served, client):
    """The latency breakdown read a fork's timings after closing it, and reported it all as transport."""
    run = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, breakpoints=[(3, 1)])
    calls = []
    real = client._call
    client._call = lambda *a: calls.append(a[0]) or real(*a)
    try:
        fork = run.fork(breakpoints=[])
        fork.close()
        parts = fork.timings_ms
    finally:
        del client._call
    assert calls == ["fork", "close"]  # no summary call to read them
    assert parts["fork_copy"] > 0 and parts["execute"] > 0
    run.close()


def test_a_brief_that_keeps_more_than_the_client_has_is_a_protocol_error(served, client):
    run = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, breakpoints=[(3, "all")])
    run.resume()
    from djinn_nb.serving import run_views

    lying = {**run_views.brief(served.engine.get(run.id), 0).to_json(), "keep": 5, "tokens": []}
    with pytest.raises(ProtocolError, match="kept 5 token ids of the 1"):
        run._update(lying)
    assert run.token_ids == served.reference[:1]  # the handle is unchanged


def test_a_plain_resume_sends_no_edit(served, client):
    """The common step sends only the run id and the count of ids held; an edit still applies."""
    run = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, breakpoints=[(3, "all")])
    sent = []
    real = client._remote("resume")
    client._methods["resume"] = lambda *a: sent.append(a) or real(*a)
    run.resume()
    run.resume(scale=1.0)
    assert sent[0] == (run.id, 0) and len(sent[1]) == 5
    assert torch.equal(run.logits(), served.engine.get(run.id).last_logits.cpu())


def test_listing_rows_match_the_engine_and_bad_rows_are_refused(served, client):
    from djinn_nb.wire.messages import RunRow
    a = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, breakpoints=[(3, "all")])
    b = client.generate(PROMPT, max_new_tokens=2)
    rows = {r["id"]: r for r in client.runs()}
    for run in (a, b):
        server_run = served.engine.get(run.id)
        row = rows[run.id]
        assert (row["state"], row["step"], row["tokens"], row["layer"]) == (
            server_run.state.value, server_run.checkpoint.step if server_run.checkpoint else server_run.step,
            len(server_run.token_ids), server_run.layer)
        assert row["bytes_held"] == server_run._count_bytes()[0]
        assert RunRow.checked(row) is row
    good = rows[a.id]
    for bad in ({**good, "tokens": "3"}, {**good, "idle_s": float("nan")}, {**good, "state": "x"},
                {k: v for k, v in good.items() if k != "parent"}):
        with pytest.raises(BadRequestError):
            RunRow.checked(bad)


def test_a_spinning_client_gets_the_same_answers_and_bad_spins_are_refused(served):
    """A client that waits on replies without sleeping sees exactly what a sleeping one sees."""
    spinning = djinn_nb.connect(f"127.0.0.1:{served.port}", spin_us=5000)
    sleeping = djinn_nb.connect(f"127.0.0.1:{served.port}", spin_us=0)
    try:
        assert spinning._conn._channel.stream.spin_s == 0.005 and sleeping._conn._channel.stream.spin_s == 0
        a = spinning.generate(PROMPT, max_new_tokens=NEW_TOKENS, breakpoints=[(3, "all")])
        while a.paused:
            a.resume()
        assert a.token_ids == served.reference
        assert sleeping.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids == served.reference
        spinning._conn._channel.stream.spin_s = 1e-5  # a reply that comes after the spin ends still arrives
        slow = spinning._remote("generate")
        assert reply(slow(wire.dumps({"prompt": PROMPT, "max_new_tokens": NEW_TOKENS})))["ok"]
    finally:
        spinning.close()
        sleeping.close()
    for bad in (-1, 1.5, True, 10**7):
        with pytest.raises(BadRequestError, match="spin_us"):
            djinn_nb.connect(f"127.0.0.1:{served.port}", spin_us=bad)
    with pytest.raises(BadRequestError, match="another process"):
        djinn_nb.connect(model="random:gpt2-tiny", spin_us=100, embedded=True)


def test_call_activity_is_quiet_only_with_no_call_running_for_a_while():
    import threading
    import time as _time

    from djinn_nb.serving.state import CallActivity

    activity = CallActivity()
    assert not activity.quiet_for(5.0)  # just made: counts as a call that just ended
    _time.sleep(0.15)
    assert activity.quiet_for(0.1)
    inside, release = threading.Event(), threading.Event()

    def call() -> None:
        with activity:
            inside.set()
            release.wait(5)

    t = threading.Thread(target=call)
    t.start()
    inside.wait(5)
    _time.sleep(0.15)
    assert not activity.quiet_for(0.1)  # a call running is never quiet, however long it has run
    release.set()
    t.join()
    assert not activity.quiet_for(5.0)
    _time.sleep(0.15)
    assert activity.quiet_for(0.1)


def test_every_exposed_call_counts_as_activity(served):
    conn = raw_connection(served.port)
    activity = served.server.state.activity
    _time = __import__("time")
    _time.sleep(0.15)
    assert activity.quiet_for(0.1)
    reply(conn.root.runs())
    assert not activity.quiet_for(5.0)
    conn.close()
