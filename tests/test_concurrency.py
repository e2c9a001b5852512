"""Many clients pausing and resuming at once against one server get exactly the unmodified tokens."""
from __future__ import annotations

import threading

import pytest

import djinn_nb
from serving import NEW_TOKENS, PROMPT, serve

THREADS = 16
CYCLES = 20


@pytest.fixture(scope="module")
def served():
    s = serve()
    yield s
    s.server.close()


def _cycles(port: int, index: int, reference: list[int], start: threading.Barrier, out: dict[int, object]) -> None:
    """CYCLES generate/pause/resume cycles on this thread's own connection; records tokens or the error."""
    try:
        client = djinn_nb.connect(f"127.0.0.1:{port}")
        start.wait(timeout=60)
        got = []
        for cycle in range(CYCLES):
            bps = [(index + cycle) % 12, ((index * 7 + cycle) % 12, cycle % NEW_TOKENS)]
            run = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, breakpoints=bps)
            pauses = 0
            while run.paused:
                pauses += 1
                run.resume()
            assert pauses >= 1, f"cycle {cycle} never paused at {bps}"
            got.append(run.token_ids)
            run.close()
        client.close()
        out[index] = got
    except BaseException as e:  # noqa: BLE001 - reported by the test thread
        out[index] = e


def test_sixteen_clients_pausing_and_resuming_get_the_unmodified_tokens(served):
    holder = djinn_nb.connect(f"127.0.0.1:{served.port}")
    parked = holder.generate(PROMPT, max_new_tokens=NEW_TOKENS, breakpoints=[5])  # paused all along
    start, out = threading.Barrier(THREADS), {}
    threads = [threading.Thread(target=_cycles, args=(served.port, i, served.reference, start, out), daemon=True)
               for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "a client is stuck: deadlock or lost reply"
    errors = {i: r for i, r in out.items() if isinstance(r, BaseException)}
    assert not errors, errors
    assert all(tokens == served.reference for i in range(THREADS) for tokens in out[i])
    assert len(out) == THREADS and all(len(out[i]) == CYCLES for i in range(THREADS))
    assert parked.refresh().paused and (parked.layer, parked.step) == (5, 0)
    assert parked.run_to_end().token_ids == served.reference
    assert [r["id"] for r in holder.runs()] == [parked.id]  # the 320 closed runs are gone
    holder.close()


def test_listing_runs_while_others_execute_changes_nothing(saved_models):
    """Listing reads every run's tensors; it must never write them back under a running step."""
    import threading

    import djinn_nb
    from djinn_nb.core.reference import generate as hf_generate, hf_model

    path = saved_models["gpt2-tiny"]
    want = hf_generate(hf_model(path), [5, 6, 7, 8], 8)
    client, poller = djinn_nb.connect(model=path), djinn_nb.connect(model=path)
    stop = threading.Event()
    errors: list[BaseException] = []

    def poll() -> None:
        while not stop.is_set():
            try:
                poller.runs()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

    t = threading.Thread(target=poll)
    t.start()
    try:
        got = []
        for _ in range(15):
            run = client.generate([5, 6, 7, 8], max_new_tokens=8, breakpoints=[(3, "all")])
            while run.paused:
                run.resume()
            got.append(run.token_ids)
            run.close()
    finally:
        stop.set()
        t.join()
    assert not errors and all(g == want for g in got)


@pytest.mark.attack(cls="fairness", tried="lens, attention, lens_grid, offload and restore calls", held="each queues as its caller, not as one anonymous user")
def test_every_call_that_takes_the_device_turn_queues_as_its_caller(monkeypatch):
    """A lens, an attention read, a lens_grid, an offload and a restore all take the device turn
    as the user who asked (they queued as one anonymous user, so one user's lens_grids made
    another's lens wait several of them)."""
    from djinn_nb.core.scheduler import FairScheduler
    from serving import serve

    served = serve(token="turn-token")
    owners: list[str] = []
    acquire = FairScheduler.acquire

    def recording(self, owner=""):
        owners.append(owner)
        return acquire(self, owner)

    try:
        client = djinn_nb.connect(f"127.0.0.1:{served.port}", token="turn-token")
        run = client.generate(PROMPT, max_new_tokens=4, breakpoints=[(3, 1)])
        me = served.engine.all_runs()[0].owner
        monkeypatch.setattr(FairScheduler, "acquire", recording)
        run.lens(k=3)
        run.attention()
        client.lens_grid(PROMPT, k=1)
        run.offload()
        run.activation()  # brings it back
        monkeypatch.undo()
        assert me != "" and len(owners) >= 4 and set(owners) == {me}, owners
        client.close()
    finally:
        served.server.close()
