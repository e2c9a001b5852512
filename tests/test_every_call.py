"""Every exposed call, walked: odd arguments are refused with a named error, never an internal one.

The list of calls comes from the service itself (every ``exposed_`` method ``_reply`` wraps), so a
call added later is walked too. Each gets no arguments, too many, wrong types, a huge string and
an unknown run id; the reply must be ``ok: false`` with a ``DjinnError`` kind other than an
internal server error, and the server must still serve a run exactly afterwards.
"""
from __future__ import annotations

import pytest

from djinn_nb.serving.service import DjinnService
from serving import NEW_TOKENS, PROMPT, raw_connection, reply, serve

CALLS = sorted(name.removeprefix("exposed_") for name in dir(DjinnService)
               if name.startswith("exposed_") and getattr(getattr(DjinnService, name), "djinn_call", False))
ODD = [(), ("r1-00000000",), (None,) * 7, (1.5, b"\xff", -1), ("x" * 100_000,), ("{}", "[]", True),
       ("{\"prompt\": [1], \"max_new_tokens\": -3}",), (10**40,), ("[" * 5000,)]


@pytest.fixture(scope="module")
def served():
    s = serve(token="walk-token")
    yield s
    s.server.close()


def test_the_walk_covers_the_calls_that_matter():
    assert {"generate", "resume", "fork", "fork_many", "causal_trace", "expect", "lens_grid", "decode_many"} <= set(CALLS)


@pytest.mark.parametrize("call", [c for c in CALLS if c != "hello"])
@pytest.mark.attack(cls="leaks", tried="odd arguments to every exposed call", held="refused by name, never an internal error")
def test_odd_arguments_are_refused_by_name_never_as_an_internal_error(served, call):
    conn = raw_connection(served.port, "walk-token")
    try:
        for args in ODD:
            try:
                raw = getattr(conn.root, call)(*args)
            except Exception as e:  # noqa: BLE001 - rpyc itself refusing to send a value is fine
                assert "internal server error" not in str(e), (call, args, e)
                continue
            msg = reply(raw)
            if msg.get("ok"):
                continue  # some calls accept some of these (e.g. info with no arguments)
            err = msg["error"]
            assert "internal server error" not in err["message"], (call, args[:1], err["message"][:300])
            assert err["kind"].endswith("Error"), (call, err)
        run = reply(conn.root.generate(f'{{"prompt": {PROMPT}, "max_new_tokens": {NEW_TOKENS}}}'))
        assert run["ok"] and run["result"]["token_ids"] == served.reference
    finally:
        conn.close()
