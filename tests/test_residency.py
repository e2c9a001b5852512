"""Paused runs: offload and restore, leases, re-attach after the client is gone, watches."""
from __future__ import annotations

import time

import pytest
import torch

import djinn_nb
from djinn_nb.core.engine import Engine
from djinn_nb.errors import UnknownRunError
from djinn_nb.serving.server import DjinnServer
from djinn_nb.core.reference import generate, hf_model

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
N = 8


@pytest.fixture(scope="module")
def model(saved_models):
    return hf_model(saved_models["gpt2-tiny"])


@pytest.fixture()
def server(model):
    srv = DjinnServer(Engine(model), "127.0.0.1", 0, lease_seconds=600).start()
    yield srv
    srv.close()


def test_offloaded_run_resumes_and_forks_exactly(server, model):
    client = djinn_nb.connect(server.address)
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[6, (6, 4)])
    run.offload()
    assert run.offloaded and client.runs()[0]["offloaded"]
    steered = run.fork(scale=0.5, breakpoints=[])
    assert steered.token_ids == generate(model, PROMPT, N, edit_layer=6, edit=lambda h: h * 0.5)
    assert not run.refresh().offloaded
    run.resume()
    assert (run.layer, run.step) == (6, 4)
    run.offload()
    assert run.resume().token_ids == generate(model, PROMPT, N)


def test_budget_offloads_least_recently_used(model):
    srv = DjinnServer(Engine(model), "127.0.0.1", 0, max_paused_bytes=1).start()
    try:
        client = djinn_nb.connect(srv.address)
        a = client.generate(PROMPT, max_new_tokens=N, breakpoints=[5])
        b = client.generate(PROMPT, max_new_tokens=N, breakpoints=[5])
        assert a.refresh().offloaded and not b.offloaded
        assert a.resume().token_ids == b.resume().token_ids == generate(model, PROMPT, N)
    finally:
        srv.close()


def test_paused_run_survives_its_client_and_can_be_attached(server, model):
    first = djinn_nb.connect(server.address)
    run = first.generate(PROMPT, max_new_tokens=N, breakpoints=[7])
    run_id = run.id
    first._conn.close()  # the kernel dies without closing anything
    second = djinn_nb.connect(server.address)
    listed = {r["id"]: r for r in second.runs()}
    assert listed[run_id]["state"] == "paused" and listed[run_id]["layer"] == 7
    assert listed[run_id]["bytes_held"] > 0
    again = second.attach(run_id)
    assert again.paused and again.resume().token_ids == generate(model, PROMPT, N)


def test_lease_expiry_frees_an_abandoned_run(model):
    engine = Engine(model)
    srv = DjinnServer(engine, "127.0.0.1", 0, lease_seconds=0.3).start()
    try:
        client = djinn_nb.connect(srv.address)
        run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[7])
        inner = engine.get(run.id)
        assert inner.cache is not None and inner.bytes_held() > 0
        client._conn.close()
        deadline = time.monotonic() + 5
        while engine.all_runs() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.all_runs() == []
        assert inner.state == "closed" and inner.cache is None and inner.checkpoint is None
        assert inner.bytes_held() == 0
        with pytest.raises(UnknownRunError, match=r"expired after 0\.3 s idle and was closed; --lease-seconds sets this"):
            djinn_nb.connect(srv.address).attach(run.id)
        with pytest.raises(UnknownRunError, match=r"no run .*closed, expired, or another client's"):
            engine.get(run.id, owner="someone else")  # only its owner learns it existed
    finally:
        srv.close()


def test_an_embedded_servers_runs_never_expire_unless_asked(saved_models):
    from djinn_nb.client import connection

    path = saved_models["gpt2-tiny"]
    client = djinn_nb.connect(model=path, dtype="float32", embedded=True)
    server = connection._embedded[(path, "cpu", "float32")]
    assert server.lease_seconds is None
    try:
        djinn_nb.connect(model=path, dtype="float32", embedded=True, lease_seconds=0.3)
        assert server.lease_seconds == 0.3
        run2 = client.generate(PROMPT, max_new_tokens=N, breakpoints=[7])
        time.sleep(1.5)
        with pytest.raises(UnknownRunError, match=r"expired after 0\.3 s idle.*connect\(lease_seconds=\.\.\.\) sets this"):
            run2.resume()
    finally:
        djinn_nb.connect(model=path, dtype="float32", embedded=True, lease_seconds=None)
    assert server.lease_seconds is None


def test_a_paused_run_outlives_many_reaper_sweeps_without_a_lease(model):
    engine = Engine(model)
    srv = DjinnServer(engine, "127.0.0.1", 0, lease_seconds=None).start()
    try:
        client = djinn_nb.connect(srv.address)
        run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[7])
        engine.get(run.id).last_used -= 10 * 24 * 3600  # idle for ten days, as far as a lease could tell
        time.sleep(1.0)  # four sweeps
        assert run.paused and run.resume().token_ids == generate(model, PROMPT, N)
    finally:
        srv.close()


@pytest.mark.parametrize("lease", [0, -1, float("inf"), float("nan"), "600", True])
def test_a_lease_is_none_or_a_positive_number(model, lease):
    from djinn_nb.errors import BadRequestError

    with pytest.raises(BadRequestError, match="lease_seconds must be None"):
        DjinnServer(Engine(model), "127.0.0.1", 0, lease_seconds=lease)


def test_a_running_servers_lease_is_its_own(server):
    from djinn_nb.errors import BadRequestError

    with pytest.raises(BadRequestError, match=r"lease_seconds=\.\.\., not both.*djinn-server --lease-seconds"):
        djinn_nb.connect(server.address, lease_seconds=5)


def test_the_command_line_takes_none_for_a_lease():
    from djinn_nb.serving.cli import _lease

    assert _lease("none") is None and _lease("120") == 120.0
    with pytest.raises(Exception, match="or 'none'"):
        _lease("-5")


def test_touching_a_run_renews_its_lease(model):
    engine = Engine(model)
    srv = DjinnServer(engine, "127.0.0.1", 0, lease_seconds=0.6).start()
    try:
        client = djinn_nb.connect(srv.address)
        run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[7])
        for _ in range(6):
            time.sleep(0.2)
            run.refresh()
        assert run.paused and run.resume().done
    finally:
        srv.close()


def test_watches_record_without_pausing(server, model):
    client = djinn_nb.connect(server.address)
    captured = []
    handle = model.transformer.h[4].register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
    try:
        ref = generate(model, PROMPT, 4)
    finally:
        handle.remove()
    run = client.generate(PROMPT, max_new_tokens=4, watches=[(4, "all")])
    assert run.done and run.token_ids == ref
    hits = run.watched()
    assert [(h["layer"], h["step"]) for h in hits] == [(4, s) for s in range(4)]
    assert hits[0]["shape"] == [1, len(PROMPT), 64] and hits[1]["shape"] == [1, 1, 64]
    for i, want in enumerate(captured):
        assert torch.equal(run.watched_activation(i), want)
    assert hits[2]["norm"] == pytest.approx(float(captured[2].norm()), rel=1e-6)
