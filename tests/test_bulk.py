"""Large tensors cross on the side channel through the public client API, exactly as inline ones."""
from __future__ import annotations

import pytest
import torch

import djinn_nb
from djinn_nb.wire import sidechannel
from djinn_nb.core.engine import Engine
from djinn_nb.serving.server import DjinnServer
from djinn_nb.core.reference import generate, hf_model

PROMPT = [4, 8, 15, 16, 23, 42]
N = 6


@pytest.fixture()
def served(saved_models):
    model = hf_model(saved_models["llama-tiny"])
    srv = DjinnServer(Engine(model), "127.0.0.1", 0).start()
    yield srv, model
    srv.close()


def test_side_channel_round_trip_matches_inline(served, monkeypatch):
    srv, model = served
    client = djinn_nb.connect(srv.address)
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[5], record_logits=True)
    inline = run.activation()
    offered = []
    real_offer = srv.state.bulk.offer
    monkeypatch.setattr(srv.state.bulk, "offer", lambda t, owner="", conn=0: offered.append(t.shape) or real_offer(t, owner, conn))
    monkeypatch.setattr(sidechannel, "BULK_THRESHOLD", 16)
    bulk = run.activation()
    assert offered == [inline.shape] and torch.equal(bulk, inline)
    steered = run.fork(activation=bulk * 0.3, breakpoints=[])  # uploaded by ticket
    want = generate(model, PROMPT, N, edit_layer=5, edit=lambda h: h * 0.3)
    assert want != generate(model, PROMPT, N) and steered.token_ids == want
    assert torch.equal(steered.logits(0), run.fork(scale=0.3, breakpoints=[]).logits(0))
    assert srv.state.bulk.pending() == 0
    assert run.resume().token_ids == generate(model, PROMPT, N)


def test_upload_ticket_is_single_use_and_owned(served, monkeypatch):
    srv, _ = served
    client = djinn_nb.connect(srv.address)
    run = client.generate(PROMPT, max_new_tokens=N, breakpoints=[5])
    h = run.activation()
    slot = client._remote("expect")
    ticket = djinn_nb.client.connection._call(slot, djinn_nb.wire.dumps({"dtype": "float32", "shape": list(h.shape)}))
    sidechannel.push(client.host, ticket, h)
    edit = djinn_nb.wire.dumps({"activation": {"ticket": ticket["ticket"]}})
    djinn_nb.client.connection._call(client._remote("edit"), run.id, edit, None, None)
    with pytest.raises(djinn_nb.errors.BadRequestError, match="unknown or expired upload ticket"):
        djinn_nb.client.connection._call(client._remote("edit"), run.id, edit, None, None)
    assert run.paused


def test_peers_holding_every_side_channel_slot_without_tickets_cannot_stop_a_transfer():
    """Eight slots, eight peers connected without a ticket (and one reconnecting in a loop): a
    client with a ticket still uploads at once, the oldest ticketless peer hung up on to make
    room (it was refused: the side channel was locked until their 5 s ran out)."""
    import socket
    import threading
    import time

    bulk = sidechannel.BulkServer("127.0.0.1", max_conns=8)
    idle = [socket.create_connection(("127.0.0.1", bulk.port)) for _ in range(8)]
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            try:
                socket.create_connection(("127.0.0.1", bulk.port)).close()
            except OSError:
                pass

    loop = threading.Thread(target=churn, daemon=True)
    loop.start()
    try:
        time.sleep(0.3)
        for _ in range(3):
            t = torch.arange(1000, dtype=torch.float32)
            slot = bulk.expect({"dtype": "float32", "shape": [1000]}, owner="ann")
            t0 = time.monotonic()
            sidechannel.push("127.0.0.1", slot, t, timeout=10)
            assert torch.equal(bulk.take(slot["ticket"], "ann"), t)
            assert time.monotonic() - t0 < sidechannel.TICKET_SECONDS
    finally:
        stop.set()
        loop.join(5)
        for s in idle:
            s.close()
        bulk.close()
