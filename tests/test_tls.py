"""TLS on both channels of a real ``djinn-server --tls-cert`` process (self-signed, made with openssl)."""
from __future__ import annotations

import socket
import ssl
import time

import pytest
import torch

import djinn_nb
from djinn_nb.errors import DjinnError, TransportError
from djinn_nb.wire import sidechannel
from server_proc import make_cert

PROMPT = [(7 * i) % 500 for i in range(600)]


def test_tls_client_moves_a_large_activation_over_the_side_channel(lab, monkeypatch):
    seen = []
    real_fetch, real_push = sidechannel.fetch, sidechannel.push
    monkeypatch.setattr(sidechannel, "fetch", lambda host, reply, *a, **kw: seen.append(("fetch", kw["ssl_context"]))
                        or real_fetch(host, reply, *a, **kw))
    monkeypatch.setattr(sidechannel, "push", lambda host, slot, t, **kw: seen.append(("push", kw["ssl_context"]))
                        or real_push(host, slot, t, **kw))
    alice = lab.connect("alice")
    try:
        run = alice.generate(PROMPT, max_new_tokens=2, breakpoints=[1], record_logits=True)
        h = run.activation()
        assert h.shape == (1, 600, 512) and h.numel() * 4 > 1 << 20
        edited = run.fork(activation=h * 0.5, breakpoints=[])  # uploaded by ticket, over TLS
        scaled = run.fork(scale=0.5, breakpoints=[])
        assert torch.equal(edited.logits(0), scaled.logits(0)) and edited.token_ids == scaled.token_ids
        assert [k for k, _ in seen] == ["fetch", "push"]
        assert all(isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
                   for _, ctx in seen)
    finally:
        for r in alice.runs():
            alice.attach(r["id"]).close()
        alice.close()


@pytest.mark.attack(cls="door", tried="a plain client to a TLS server", held="refused within seconds")
def test_plain_client_to_a_tls_server_is_refused_within_seconds(lab):
    t0 = time.monotonic()
    with pytest.raises(DjinnError, match="TLS"):
        djinn_nb.connect(lab.address, token=lab.tokens["alice"])
    assert time.monotonic() - t0 < 5


@pytest.mark.attack(cls="wire", tried="a server with a certificate from another CA", held="the client refuses it")
def test_client_trusting_another_ca_refuses_the_server(lab, tmp_path):
    other, _ = make_cert(tmp_path, "other-ca")
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="not trusted"):
        djinn_nb.connect(lab.address, token=lab.tokens["alice"], tls_ca=other)
    assert time.monotonic() - t0 < 5


@pytest.mark.attack(cls="door", tried="a plain peer on a TLS side channel", held="refused")
def test_side_channel_refuses_a_plain_peer(lab):
    """A plain TCP peer on the TLS side channel gets no byte; the server keeps serving."""
    alice = lab.connect("alice")
    try:
        run = alice.generate(PROMPT[:8], max_new_tokens=2, breakpoints=[1])
        port = alice._call("expect", djinn_nb.wire.dumps({"dtype": "float32", "shape": [4]}))["port"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"\x00" * 32)
            try:
                got = sock.recv(1)
            except ConnectionResetError:
                got = b""
            assert got in (b"\x15", b"")  # a TLS alert or the end, never tensor bytes
        assert run.resume().done
    finally:
        for r in alice.runs():
            alice.attach(r["id"]).close()
        alice.close()
