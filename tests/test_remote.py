"""Over a real network's latency: each action costs its compute plus a few round trips.

A ``djinn-server`` (the embedded SmolLM2, in this process) seen through
``experiments/harness/latency_proxy.py``: every byte delayed 12.5 ms each way (25 ms round trip), on
both channels. Each action's wall time through the link, less the same action's on loopback
measured beside it, must stay within 3 round trips (issue 21's goal) plus a margin for a busy
2-core machine; a large activation crosses on the side channel through the link.
"""
from __future__ import annotations

import time

import pytest
import torch

import djinn_nb
from djinn_nb.serving.embedded import start_embedded_server
from djinn_nb.wire import sidechannel
from experiments.harness.latency_proxy import DelayedServer

RTT = 0.025
PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def server():
    srv = start_embedded_server(None, "cpu", None)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def far_address(server):
    """The server through the link (both channels), for the whole module: one proxy."""
    with DelayedServer(server.address, server.state.bulk.port, rtt_ms=RTT * 1000) as address:
        yield address


def _fastest(local, remote, rounds: int = 7) -> tuple[float, float]:
    """Each action's fastest of ``rounds``, on loopback and through the link, interleaved round by
    round (the fastest is what load spikes leave alone: the action's compute plus its link)."""
    local(), remote()  # warm: caches, first calls
    near, far = [], []
    for _ in range(rounds):
        for action, times in ((local, near), (remote, far)):
            t0 = time.perf_counter()
            action()
            times.append(time.perf_counter() - t0)
    return min(near), min(far)


def _actions(client):
    paused = client.generate(PROMPT, max_new_tokens=4, breakpoints=[(10, 1)])

    def generate() -> None:
        client.generate(PROMPT, max_new_tokens=4, breakpoints=[(10, 1)]).close()  # two calls

    def fork_text() -> None:
        assert paused.fork(scale=0.9, breakpoints=[], close=True).text

    def lens() -> None:
        paused.lens(k=3)

    def runs() -> None:
        client.runs()

    def trace() -> None:
        djinn_nb.causal_trace(client, "The Eiffel Tower is in", "The Colosseum is in", layers=[0, 10, 20],
                              progress=False)

    return {"generate": generate, "fork_text": fork_text, "lens": lens, "runs": runs, "causal_trace": trace}, paused


def test_each_action_costs_at_most_three_round_trips_over_a_25ms_link(server, far_address):
    near, far = djinn_nb.connect(server.address), djinn_nb.connect(far_address)
    try:
        local, _ = _actions(near)
        remote, _ = _actions(far)
        over, allowed = {}, {}
        for name in local:
            base, linked = _fastest(local[name], remote[name])
            over[name] = (linked - base) / RTT
            # 3 round trips of link (issue 21's goal), and a margin for a busy 2-core machine:
            # a quarter of the action's own time and 15 ms
            allowed[name] = 3 + (0.25 * base + 0.015) / RTT
    finally:
        far.close()
        near.close()
    assert all(over[k] <= allowed[k] for k in over), {k: f"{over[k]:.1f} RTT (allowed {allowed[k]:.1f})" for k in over}
    assert over["runs"] >= 0.9  # the link is really there: one call is one round trip


def test_a_large_activation_crosses_the_side_channel_through_the_link(far_address):
    far = djinn_nb.connect(far_address)
    try:
        run = far.generate(" ".join(["word"] * 600), max_new_tokens=1, breakpoints=[5])
        act = run.activation()
        assert act.numel() * act.element_size() >= sidechannel.BULK_THRESHOLD
        assert act.shape[1] > 500 and torch.isfinite(act).all()
        run.close()
    finally:
        far.close()
