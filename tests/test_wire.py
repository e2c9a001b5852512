"""The tensor wire: codec fuzz, frames, the side channel, and hostile arguments to every exposed call."""
from __future__ import annotations

import json
import math
import socket
import struct
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from djinn_nb import wire
from djinn_nb.wire import sidechannel
from djinn_nb.errors import ERROR_CLASSES, BadRequestError, DjinnError
from djinn_nb.serving.service import DjinnService
from djinn_nb.wire.transport import FastChannel, FastSocketStream
from serving import NEW_TOKENS, PROMPT, raw_connection, reply, serve, where

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
dims = st.integers(min_value=-3, max_value=6) | st.sampled_from([2**40, 2**40 + 1, 2**63, -(2**63)])
headers = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"dtype": st.sampled_from(sorted(wire.WIRE_DTYPES)) | st.text(max_size=10) | json_values,
         "shape": st.lists(dims, max_size=9) | json_values}
    ),
)
payloads = st.binary(max_size=512) | st.none() | st.integers() | st.text(max_size=16) | st.binary(max_size=16).map(bytearray)


@st.composite
def near_misses(draw):
    """A valid header with a payload of the right length, or one off by a few bytes."""
    dtype = draw(st.sampled_from(sorted(wire.WIRE_DTYPES)))
    shape = draw(st.lists(st.integers(0, 5), max_size=4))
    size = math.prod(shape) * torch.empty((), dtype=wire.WIRE_DTYPES[dtype]).element_size()
    return {"dtype": dtype, "shape": shape}, draw(st.binary(min_size=max(0, size - 2), max_size=size + 2))


# ----- codec ------------------------------------------------------------------------
@FUZZ
@given(meta=headers, data=payloads)
def test_decode_tensor_either_refuses_or_rebuilds_exactly(meta, data):
    _check_decode(meta, data)


@FUZZ
@given(case=near_misses())
def test_decode_tensor_near_misses(case):
    _check_decode(*case)


def _check_decode(meta, data):
    try:
        t = wire.decode_tensor(meta, data)
    except BadRequestError:
        return
    assert meta["dtype"] in wire.WIRE_DTYPES and t.dtype == wire.WIRE_DTYPES[meta["dtype"]]
    assert list(t.shape) == meta["shape"]
    assert t.numel() * t.element_size() == len(data)
    assert (t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"") == data


@FUZZ
@given(dtype=st.sampled_from(sorted(wire.WIRE_DTYPES)), shape=st.lists(st.integers(0, 4), max_size=4), seed=st.integers(0, 99))
def test_encode_decode_round_trip(dtype, shape, seed):
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 100).to(wire.WIRE_DTYPES[dtype])
    meta, data = wire.encode_tensor(t)
    back = wire.decode_tensor(meta, data)
    assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
    back.add_(1)  # the decoded tensor owns writable memory


def test_decode_refuses_oversize_before_reading_payload():
    with pytest.raises(BadRequestError, match="cap"):
        wire.decode_tensor({"dtype": "float32", "shape": [1024]}, b"", max_bytes=4095)


@FUZZ
@given(text=st.text(max_size=64) | st.binary(max_size=16) | st.integers() | st.none() | json_values.map(json.dumps))
def test_loads_either_refuses_or_parses_as_json(text):
    try:
        value = wire.loads(text)
    except BadRequestError:
        return
    assert type(text) is str and value == json.loads(text)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "[1, NaN]"])
def test_loads_refuses_non_finite_constants(constant):
    with pytest.raises(BadRequestError):
        wire.loads(constant)


# ----- frames -----------------------------------------------------------------------
def _channel_pair() -> tuple[FastChannel, FastChannel, socket.socket]:
    a, b = socket.socketpair()
    return FastChannel(FastSocketStream(a)), FastChannel(FastSocketStream(b)), a


def test_frames_cross_intact_and_are_counted():
    tx, rx, _ = _channel_pair()
    for n in (0, 10, 1 << 17):
        data = bytes(range(256)) * (n // 256) + b"x" * (n % 256)
        tx.send(data)
        assert bytes(rx.recv()) == data
    assert tx.stream.bytes_out == rx.stream.bytes_in == sum(n + 6 for n in (0, 10, 1 << 17))


def test_compressed_or_unterminated_frames_end_the_connection():
    _, rx, raw = _channel_pair()
    raw.sendall(struct.pack("!LB", 3, 1) + b"abc\n")
    with pytest.raises(EOFError, match="compressed"):
        rx.recv()
    _, rx, raw = _channel_pair()
    raw.sendall(struct.pack("!LB", 3, 0) + b"abcX")
    with pytest.raises(EOFError, match="flusher"):
        rx.recv()


# ----- the side channel -------------------------------------------------------------
@pytest.fixture(scope="module")
def bulk():
    b = sidechannel.BulkServer("127.0.0.1", ttl=30)
    yield b
    b.close()


@pytest.mark.parametrize("shape,dtype", [((3, 5), torch.float32), ((), torch.bfloat16), ((0, 4), torch.float16), ((70000,), torch.int64)])
def test_side_channel_round_trip(bulk, shape, dtype):
    t = (torch.randn(shape) * 50).to(dtype)
    assert torch.equal(sidechannel.fetch("127.0.0.1", bulk.offer(t)), t)
    slot = bulk.expect({"dtype": wire.dtype_name(dtype), "shape": list(shape)})
    sidechannel.push("127.0.0.1", slot, t)
    assert torch.equal(bulk.take(slot["ticket"]), t)


def test_side_channel_tickets_are_single_use_and_unguessable(bulk):
    offer = bulk.offer(torch.ones(1000))
    sidechannel.fetch("127.0.0.1", offer)
    with pytest.raises(DjinnError, match="ticket"):
        sidechannel.fetch("127.0.0.1", offer)
    forged = {**bulk.offer(torch.ones(4)), "ticket": "00" * sidechannel.TICKET_BYTES}
    with pytest.raises(DjinnError, match="ticket"):
        sidechannel.fetch("127.0.0.1", forged)
    with pytest.raises(BadRequestError):
        sidechannel.fetch("127.0.0.1", {**forged, "ticket": "zz"})


def test_side_channel_refuses_bad_headers_and_short_uploads(bulk):
    with pytest.raises(BadRequestError, match="cap"):
        bulk.expect({"dtype": "float32", "shape": [1 << 20]}, max_bytes=1 << 10)
    with pytest.raises(BadRequestError, match="dtype"):
        bulk.expect({"dtype": "pickle", "shape": [1]})
    slot = bulk.expect({"dtype": "float32", "shape": [1000]})
    with pytest.raises(DjinnError, match="upload failed"):
        sidechannel.push("127.0.0.1", slot, torch.ones(10))  # 40 of 4000 bytes, then the client waits in vain
    with pytest.raises(BadRequestError, match="unknown or expired upload ticket"):  # freed at once
        bulk.take(slot["ticket"], timeout=0.2)


def test_side_channel_uploads_belong_to_their_owner(bulk):
    t = torch.arange(6.0)
    slot = bulk.expect({"dtype": "float32", "shape": [6]}, owner="alice")
    sidechannel.push("127.0.0.1", slot, t)
    with pytest.raises(BadRequestError, match="ticket"):
        bulk.take(slot["ticket"], owner="mallory")
    assert torch.equal(bulk.take(slot["ticket"], owner="alice"), t)


def test_side_channel_expired_offers_are_dropped():
    b = sidechannel.BulkServer("127.0.0.1", ttl=0.0)
    try:
        offer = b.offer(torch.ones(10))
        assert b.pending() == 0
        with pytest.raises(DjinnError):
            sidechannel.fetch("127.0.0.1", offer)
    finally:
        b.close()


# ----- hostile arguments to every exposed call ------------------------------------------
@pytest.fixture(scope="module")
def paused():
    """A server, a raw connection that passed hello, and a run paused at (3, 0)."""
    served = serve()
    conn = raw_connection(served.port)
    run = reply(conn.root.generate(wire.dumps({"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "breakpoints": [3]})))["result"]
    yield served, conn, run["id"], where(conn, run["id"])
    conn.close()
    served.server.close()


EXPOSED = sorted(n[len("exposed_"):] for n in dir(DjinnService)
                 if n.startswith("exposed_") and n != "exposed_hello" and getattr(getattr(DjinnService, n), "djinn_call", False))
SUCCEED_WITHOUT_ARGS = {"runs", "info", "saes"}  # readers that take nothing
argument = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.binary(max_size=64)
    | json_values.map(wire.dumps) | st.sampled_from(['{"scale": 2.0}', '{"activation": {"dtype": "float32", "shape": [1, 8, 64]}}', "[3]", "r999"])
)


@pytest.mark.parametrize("name", EXPOSED)
def test_exposed_call_fuzz_gets_errors_and_leaves_the_paused_run(paused, name):
    served, conn, run_id, before = paused
    baseline = served.engine.runs()

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(args=st.lists(argument, max_size=6))  # any arity: a wrong count is a BadRequestError too
    def fuzz(args):
        assume(run_id not in args and wire.dumps(run_id) not in args)  # the real id may do real things
        msg = reply(getattr(conn.root, name)(*args))
        if msg["ok"]:
            assert name in SUCCEED_WITHOUT_ARGS and not args, (name, args, msg)
        else:
            assert msg["error"]["kind"] in ERROR_CLASSES, msg
            assert not msg["error"]["message"].startswith("internal server error"), (name, args, msg)
        assert where(conn, run_id) == before

    fuzz()
    assert served.engine.runs() == baseline  # nothing started, nothing freed


def test_wrong_arity_is_a_bad_request_not_an_internal_error(paused):
    _, conn, run_id, _ = paused
    msg = reply(conn.root.status(run_id, "extra", 3))
    assert msg["error"]["kind"] == "BadRequestError" and "internal" not in msg["error"]["message"]


def test_hello_fuzz_refuses_and_the_server_keeps_serving(paused):
    served, conn, run_id, before = paused

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(protocol=st.none() | st.integers() | st.text(max_size=4) | st.floats(), token=st.none() | st.integers() | st.binary(max_size=8))
    def fuzz(protocol, token):
        assume(protocol != 1)
        msg = reply(conn.root.hello(protocol, token))
        assert msg["ok"] is False and msg["error"]["kind"] in ("ProtocolError", "BadRequestError")

    fuzz()
    assert where(conn, run_id) == before


def test_paused_run_resumes_to_the_reference_after_fuzzing(paused):
    served, conn, run_id, _ = paused
    state = "paused"
    while state == "paused":
        state = reply(conn.root.resume(run_id))["result"]["state"]
    assert where(conn, run_id)[3] == served.reference


# ----- bad tensors over the wire ------------------------------------------------------------
@pytest.fixture()
def capped():
    """A server whose payload cap (1000 B) is below the paused activation's size (8 x 64 fp32 = 2048 B)."""
    served = serve(max_payload=1000)
    conn = raw_connection(served.port)
    run = reply(conn.root.generate(wire.dumps({"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "breakpoints": [3]})))["result"]
    yield served, conn, run["id"]
    conn.close()
    served.server.close()


HEADER = {"dtype": "float32", "shape": [1, len(PROMPT), 64]}
BAD_EDITS = {
    "bytes do not match shape": (wire.dumps({"add": {"dtype": "float32", "shape": [64]}}), None, b"\0" * 100, "needs"),
    "unknown dtype": (wire.dumps({"activation": {**HEADER, "dtype": "object"}}), b"\0" * 2048, None, "unknown dtype"),
    "oversize for the cap": (wire.dumps({"activation": HEADER}), b"\0" * 2048, None, "cap"),
    "payload is not bytes": (wire.dumps({"add": {"dtype": "float32", "shape": [64]}}), None, "abc", "bytes"),
    "bytes without a header": (wire.dumps({"scale": 2.0}), b"\0" * 8, None, "without"),
    "edit is not JSON": ("{scale: 2", None, None, "JSON"),
    "scale of the wrong type": (wire.dumps({"scale": "big"}), None, None, "scale"),
    "unknown edit key": (wire.dumps({"pickle": 1}), None, None, "edit"),
}


@pytest.mark.parametrize("case", sorted(BAD_EDITS))
@pytest.mark.parametrize("call", ["resume", "edit", "fork"])
def test_bad_tensor_input_is_refused_and_changes_nothing(capped, case, call):
    served, conn, run_id = capped
    edit_json, act, add, message = BAD_EDITS[case]
    before, runs_before = where(conn, run_id), served.engine.runs()
    if call == "fork":  # a fork request carries its edit under "edit"
        edit_json = '{"edit": ' + edit_json + "}"
    args = (run_id, None, edit_json, act, add) if call == "resume" else (run_id, edit_json, act, add)
    msg = reply(getattr(conn.root, call)(*args))
    assert msg["ok"] is False and msg["error"]["kind"] in ("BadRequestError", "ActivationError")
    assert message.lower() in msg["error"]["message"].lower()
    assert where(conn, run_id) == before and served.engine.runs() == runs_before
    state = "paused"
    while state == "paused":
        state = reply(conn.root.resume(run_id))["result"]["state"]
    assert where(conn, run_id)[3] == served.reference


def test_scale_edit_within_the_cap_still_works(capped):
    served, conn, run_id = capped
    norm = reply(conn.root.summary(run_id))["result"]["activation"]["norm"]
    msg = reply(conn.root.edit(run_id, wire.dumps({"scale": 0.5}), None, None))
    assert msg["ok"] and msg["result"]["id"] == run_id and msg["result"]["state"] == "paused"
    after = reply(conn.root.summary(run_id))["result"]["activation"]
    assert after["edited"] and math.isclose(after["norm"], 0.5 * norm, rel_tol=1e-5)


def test_side_channel_owners_cannot_evict_each_other():
    """Over a share or a full table a new slot is refused; nobody's pending transfer is ever dropped."""
    from djinn_nb.errors import QuotaError
    from djinn_nb.wire.sidechannel import BulkServer

    bulk = BulkServer(per_owner=2, max_slots=4)
    try:
        meta = {"dtype": "float32", "shape": [4]}
        alice = bulk.expect(meta, owner="alice")
        bob = [bulk.expect(meta, owner="bob") for _ in range(2)]
        with pytest.raises(QuotaError, match="side channel is busy"):
            bulk.expect(meta, owner="bob")  # over his share: refused, his own slots kept too
        assert bulk.pending() == 3
        bulk.expect(meta, owner="carol")
        with pytest.raises(QuotaError, match="side channel is busy"):
            bulk.expect(meta, owner="dave")
        sidechannel.push("127.0.0.1", alice, torch.arange(4.0))
        sidechannel.push("127.0.0.1", bob[0], torch.arange(4.0) + 1)
        assert torch.equal(bulk.take(alice["ticket"], owner="alice"), torch.arange(4.0))
        assert torch.equal(bulk.take(bob[0]["ticket"], owner="bob"), torch.arange(4.0) + 1)
    finally:
        bulk.close()


edit_spec = st.fixed_dictionaries(
    {},
    optional={
        "scale": st.none() | st.floats() | st.integers(min_value=-(10**400), max_value=10**400) | st.text(max_size=4),
        "activation": st.none() | st.fixed_dictionaries({"dtype": st.sampled_from(["float32", "float64", "int64", "x"]),
                                                         "shape": st.lists(st.integers(-1, 70), max_size=4)}),
        "add": st.none() | st.fixed_dictionaries({"dtype": st.sampled_from(["float32", "bfloat16"]),
                                                  "shape": st.lists(st.integers(0, 70), max_size=2)}),
    },
)


@pytest.mark.parametrize("call", ["edit", "fork"])
def test_fuzzed_edits_on_the_real_run_either_apply_cleanly_or_change_nothing(call):
    """The live run's id with hostile edits: each reply is a clean error or a clean success;
    the paused run is where it was and, once edits are reset, resumes to the reference."""
    served = serve()
    conn = raw_connection(served.port)
    try:
        run_id = reply(conn.root.generate(wire.dumps({"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "breakpoints": [3]})))["result"]["id"]
        before = where(conn, run_id)

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(spec=edit_spec, payload=st.none() | st.binary(max_size=1024), add=st.none() | st.binary(max_size=300))
        @example(spec={"scale": 1e20}, payload=None, add=None)  # applies; a fork's later layers overflow
        @example(spec={"scale": 10**39}, payload=None, add=None)  # an int past int64 (was an internal error)
        def fuzz(spec, payload, add):
            request = {"edit": spec} if call == "fork" else spec  # a fork request carries its edit under "edit"
            msg = reply(getattr(conn.root, call)(run_id, wire.dumps(request), payload, add))
            if not msg["ok"]:
                assert msg["error"]["kind"] in ERROR_CLASSES, msg
                assert not msg["error"]["message"].startswith("internal server error"), (spec, msg)
            elif call == "fork":
                reply(conn.root.close(msg["result"]["id"]))
            for row in reply(conn.root.runs())["result"]:
                if row["id"] != run_id:  # only a fork whose later layers overflowed stays: failed, named in the error
                    assert not msg["ok"] and row["state"] == "failed" and row["id"] in msg["error"]["message"], (row, msg)
                    reply(conn.root.close(row["id"]))
            reply(conn.root.reset_edit(run_id))
            assert where(conn, run_id) == before

        fuzz()
        assert [r["id"] for r in reply(conn.root.runs())["result"]] == [run_id]
        assert reply(conn.root.summary(run_id))["result"]["activation"]["edited"] is False
        while reply(conn.root.status(run_id))["result"]["state"] == "paused":
            reply(conn.root.resume(run_id, None, "{}", None, None))
        assert where(conn, run_id)[3] == served.reference
    finally:
        conn.close()
        served.server.close()


# ----- typed replies ----------------------------------------------------------------------
def test_info_runs_and_watched_are_built_and_read_as_their_schema_classes(monkeypatch):
    """hello/info, runs and watched answer typed messages (wire/messages.py), as lens and history do: the server
    builds each reply through its class and nothing else, each parses back exactly, and the client reads
    each through it (a field more or fewer, or of the wrong type, is a ProtocolError naming the call)."""
    import djinn_nb
    from djinn_nb.client import connection
    from djinn_nb.errors import ProtocolError
    from djinn_nb.wire.messages import HelloReply, RunRow, ServerInfo, WatchHit
    from djinn_nb.wire.typed import Message
    from djinn_nb.wire.protocol import PROTOCOL

    served = serve()
    built: list[type] = []
    to_json = Message.to_json

    def spied(self):
        built.append(type(self))
        return to_json(self)

    monkeypatch.setattr(Message, "to_json", spied)
    conn = raw_connection(served.port, hello=False)
    client = djinn_nb.connect(f"127.0.0.1:{served.port}")

    def sent(name, *args):
        built.clear()
        msg = reply(getattr(conn.root, name)(*args))
        assert msg["ok"], msg
        return msg["result"], set(built)

    try:
        hello, classes = sent("hello", PROTOCOL, None)
        assert classes == {HelloReply} and HelloReply.from_json(hello).to_json() == hello == client.info
        info, classes = sent("info")
        assert classes == {ServerInfo} and ServerInfo.from_json(info).to_json() == info
        assert info == {k: v for k, v in hello.items() if k not in ("server_version", "protocol")}
        run_id = reply(conn.root.generate(wire.dumps({"prompt": PROMPT, "max_new_tokens": 3, "breakpoints": [[3, 2]],
                                                      "watches": [[2, "all"]]})))["result"]["id"]
        rows, classes = sent("runs")
        assert classes == {RunRow} and [RunRow.from_json(r).to_json() for r in rows] == rows
        assert [r["id"] for r in rows] == [run_id] and rows[0]["state"] == "paused" and rows[0]["step"] == 2
        hits, classes = sent("watched", run_id)
        assert classes == {WatchHit} and [WatchHit.from_json(h).to_json() for h in hits] == hits
        assert [(h["index"], h["layer"], h["step"]) for h in hits] == [(0, 2, 0), (1, 2, 1), (2, 2, 2)]  # block 2 precedes 3
        handle = client.attach(run_id)
        assert handle.watched() == hits and [r["id"] for r in client.runs()] == [run_id]

        doctored = [("runs", lambda rows: [{**rows[0], "extra": 1}]), ("runs", lambda rows: [{**rows[0], "tokens": "3"}]),
                    ("watched", lambda hits: [{**hits[0], "extra": 1}]),
                    ("watched", lambda hits: [{k: v for k, v in hits[0].items() if k != "norm"}]),
                    ("watched", lambda hits: [{**hits[0], "shape": ["1"]}])]
        for name, doctor in doctored:
            real = client._remote(name)
            client._methods[name] = lambda *a, real=real, doctor=doctor: wire.dumps(
                {"ok": True, "result": doctor(reply(real(*a))["result"])})
            with pytest.raises(ProtocolError, match=name):
                client.runs() if name == "runs" else handle.watched()
            del client._methods[name]
        real_call = connection._call
        for doctor in (lambda r: {**r, "extra": 1}, lambda r: {**r, "num_layers": "4"},
                       lambda r: {k: v for k, v in r.items() if k != "sites"}):
            monkeypatch.setattr(connection, "_call", lambda fn, *a, doctor=doctor: (
                lambda r: doctor(r) if isinstance(r, dict) and "server_version" in r else r)(real_call(fn, *a)))
            with pytest.raises(ProtocolError, match="hello: HelloReply"):
                djinn_nb.connect(f"127.0.0.1:{served.port}")
    finally:
        conn.close()
        client.close()
        served.server.close()


# ----- every call's reply, typed ----------------------------------------------------------
TENSOR = "tensor"  # (header JSON, bytes): a tensor payload, or a lens grid's headers and one payload


def _replies() -> dict[str, Any]:
    from djinn_nb.wire.calls import (AttributionReply, CausalTraceReply, ClosedReply, DecodeManyReply, ExpectReply,
                                     FeaturesReply, SaeInfo, SaeUnloaded)
    from djinn_nb.wire.messages import (DiffReply, HelloReply, HistoryRecord, LensReply, RunBrief, RunRow, RunSummary,
                                        ServerInfo, WatchHit)
    briefs = ("resume", "fork", "edit", "reset_edit", "offload", "status", "next_layer", "next_step", "step_through",
              "rewind")
    return {"hello": HelloReply, "info": ServerInfo, "generate": RunSummary, "summary": RunSummary,
            **{name: RunBrief for name in briefs}, "fork_many": [RunBrief], "runs": [RunRow], "close": ClosedReply,
            "activation": TENSOR, "logits": TENSOR, "attention": TENSOR, "watched_activation": TENSOR,
            "lens_grid": TENSOR, "lens": LensReply, "watched": [WatchHit], "expect": ExpectReply,
            "tokenize": [int], "decode": str, "decode_each": [str], "decode_many": DecodeManyReply,
            "token_probs": [float], "causal_trace": CausalTraceReply, "history": [HistoryRecord], "diff": DiffReply,
            "load_sae": SaeInfo, "saes": [SaeInfo], "unload_sae": SaeUnloaded, "features": FeaturesReply,
            "attribution_patching": AttributionReply}


#: what each exposed call answers: a schema class, ``[cls]`` a list of them, or a plain payload
#: (a scalar type, ``[scalar type]``, ``TENSOR``); never an untyped dict. A call added without an
#: entry here fails ``test_every_call_answers_a_schema_class_or_a_plain_payload``.
REPLIES = _replies()


def _requests() -> dict[str, Any]:
    from djinn_nb.wire.calls import (AttributionRequest, CausalTraceRequest, DecodeManyRequest, FeaturesRequest,
                                     LensGridRequest, LoadSaeRequest, TokenProbsRequest)
    from djinn_nb.wire.messages import DiffRequest, EditRequest, ForkRequest, GenerateRequest
    plain = ("hello", "info", "summary", "runs", "close", "reset_edit", "offload", "status", "next_layer", "next_step",
             "rewind", "activation", "logits", "attention", "watched_activation", "lens", "watched", "history",
             "tokenize", "decode", "decode_each", "saes", "unload_sae", "expect")
    return {**{name: None for name in plain}, "generate": GenerateRequest, "fork": ForkRequest,
            "fork_many": ForkRequest, "edit": EditRequest, "resume": EditRequest, "step_through": EditRequest,
            "diff": DiffRequest, "causal_trace": CausalTraceRequest, "attribution_patching": AttributionRequest,
            "load_sae": LoadSaeRequest, "features": FeaturesRequest, "decode_many": DecodeManyRequest,
            "token_probs": TokenProbsRequest, "lens_grid": LensGridRequest}


#: the schema class each call reads its JSON request through; None: plain arguments only (run
#: ids, numbers, JSON lists of token ids, a tensor header that ``wire.check_header`` checks)
REQUESTS = _requests()
EXPOSED = sorted(name.removeprefix("exposed_") for name in dir(DjinnService)
                 if name.startswith("exposed_") and getattr(getattr(DjinnService, name), "djinn_call", False))


def _typed(kind: Any) -> bool:
    """A schema class (a Message, or the hand-parsed RunBrief), a list of one, or a plain payload."""
    from djinn_nb.wire.messages import RunBrief
    from djinn_nb.wire.typed import Message

    if type(kind) is list:
        return len(kind) == 1 and kind[0] is not dict and _typed(kind[0])
    return kind == TENSOR or kind in (str, int, float, bool) or kind is RunBrief or (
        isinstance(kind, type) and issubclass(kind, Message))


def test_every_call_answers_a_schema_class_or_a_plain_payload():
    """The table covers exactly the service's exposed calls, and names no untyped dict."""
    assert set(REPLIES) == set(EXPOSED), ("calls without an entry:", set(EXPOSED) - set(REPLIES),
                                          "entries without a call:", set(REPLIES) - set(EXPOSED))
    assert [name for name, kind in REPLIES.items() if not _typed(kind)] == []
    assert set(REQUESTS) == set(EXPOSED), set(EXPOSED) ^ set(REQUESTS)
    assert [name for name, kind in REQUESTS.items() if kind is not None and not _typed(kind)] == []


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The embedded SmolLM2 (a tokenizer: replies carry their texts) served in-process, and an SAE
    directory for it (layer 3's resid_post)."""
    from djinn_nb.core.engine import Engine
    from djinn_nb.core.models import load_model
    from djinn_nb.serving.server import DjinnServer
    from test_saes import write_sae

    loaded = load_model(None)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.name)
    sae_dir = tmp_path_factory.mktemp("sae") / "resid3"
    write_sae(sae_dir, int(loaded.model.config.hidden_size), "blocks.3.hook_resid_post")
    server = DjinnServer(engine, "127.0.0.1", 0).start()
    yield server, str(sae_dir)
    server.close()


def _recipes(conn: Any, sae_dir: str) -> list[tuple[str, Any]]:
    """Each exposed call with arguments it serves, in an order where each finds what it needs."""
    clean, corrupted = [504, 26052, 28457, 314, 3216, 281], [504, 8941, 28457, 314, 3216, 281]

    def paused() -> str:
        req = {"prompt": clean, "max_new_tokens": 8, "breakpoints": [[3, 1]], "watches": [[2, "all"]],
               "record_logits": True}
        return reply(conn.root.generate(wire.dumps(req)))["result"]["id"]

    grid = {"clean": clean, "corrupted": corrupted, "layers": [0, 1], "positions": [0, 1]}
    run = paused()
    other = reply(conn.root.fork(run, "{}"))["result"]["id"]
    return [
        ("info", ()), ("generate", (wire.dumps({"prompt": clean, "max_new_tokens": 2}),)), ("summary", (run,)),
        ("runs", ()), ("status", (run,)), ("activation", (run,)), ("logits", (run,)), ("attention", (run,)),
        ("lens", (run, 3)), ("lens_grid", (wire.dumps({"prompt": clean, "k": 2}),)), ("watched", (run,)),
        ("watched_activation", (run, 0)), ("expect", (wire.dumps({"dtype": "float32", "shape": [4]}),)),
        ("tokenize", ("The Eiffel Tower",)), ("decode", ("[504, 26052]",)), ("decode_each", ("[504, 26052]",)),
        ("decode_many", (wire.dumps({"sequences": [[504, 26052], []], "tokens": [281]}),)),
        ("token_probs", (wire.dumps({"runs": [run, other], "token": 281}),)), ("history", (other,)),
        ("diff", (wire.dumps({"a": run, "b": other, "layers": [0, 1]}),)),
        ("causal_trace", (wire.dumps(grid),)), ("attribution_patching", (wire.dumps(grid),)),
        ("load_sae", (wire.dumps({"path": sae_dir, "site": None, "id": "walked"}),)), ("saes", ()),
        ("features", (run, wire.dumps({"sae": "walked", "k": 3}))), ("unload_sae", ("walked",)),
        ("edit", (run, wire.dumps({"scale": 2.0}))), ("reset_edit", (run,)), ("fork", (run, "{}")),
        ("fork_many", (run, "[{}, {\"close\": true}]")), ("next_layer", (run,)), ("next_step", (run,)),
        ("step_through", (run, 1, None, "{}")), ("rewind", (run, 0)), ("offload", (run,)),
        ("resume", (run, None, "{}")),
        ("close", (run,)),
    ]


def test_every_call_is_built_and_read_as_its_table_entry(smol, monkeypatch):
    """Every exposed call, made: a JSON request is read on the server through its class
    (``from_json``); a schema-class reply (a brief too) is built there through that class (``to_json``) and parses
    back to the very same JSON, a list of them item by item; a plain payload is what its entry says.
    A call whose request or reply went back to a hand-read or hand-made dict fails here."""
    from djinn_nb.wire.messages import RunBrief
    from djinn_nb.wire.typed import Message
    from djinn_nb.wire.protocol import PROTOCOL

    server, sae_dir = smol
    built: list[type] = []
    to_json, from_json, brief_json = Message.to_json, Message.__dict__["from_json"].__func__, RunBrief.to_json

    def spied(self):
        built.append(type(self))
        return to_json(self)

    def spied_brief(self):
        built.append(RunBrief)
        return brief_json(self)

    def parsed(cls, obj):
        built.append(cls)
        return from_json(cls, obj)

    monkeypatch.setattr(Message, "to_json", spied)
    monkeypatch.setattr(Message, "from_json", classmethod(parsed))
    monkeypatch.setattr(RunBrief, "to_json", spied_brief)
    conn = raw_connection(server.port, hello=False)
    wrong: list[Any] = []
    try:
        def made(name: str, args: Any) -> tuple[str, Any, list[type]]:
            built.clear()
            return name, getattr(conn.root, name)(*args), list(built)

        answers = [made("hello", (PROTOCOL, None))]
        answers += [made(name, args) for name, args in _recipes(conn, sae_dir)]
        for name, raw, classes in answers:
            msg = reply(raw)
            if not msg["ok"]:
                wrong.append((name, msg["error"]))
                continue
            if REQUESTS[name] is not None and REQUESTS[name] not in classes:
                wrong.append((name, f"request not read through {REQUESTS[name].__name__}"))
            result, kind = msg["result"], REPLIES[name]
            item = kind[0] if type(kind) is list else kind
            items = result if type(kind) is list else [result]
            if type(kind) is list and (type(result) is not list or not result):
                wrong.append((name, "expected a non-empty list", type(result).__name__))
            elif kind == TENSOR:
                if not (isinstance(raw, tuple) and type(raw[1]) is bytes and type(result) is dict):
                    wrong.append((name, "expected a tensor payload"))
            elif item in (str, int, float, bool):
                if not all(type(x) is item for x in items):
                    wrong.append((name, "expected", item.__name__, str(result)[:80]))
            elif item is RunBrief:  # built on the server (serving/run_views.py), parsed by hand on the client
                if RunBrief not in classes:
                    wrong.append((name, "not built through RunBrief"))
                for x in items:
                    if RunBrief.from_json(x).to_json() != x:
                        wrong.append((name, "does not parse back to the same JSON"))
            else:
                if item not in classes:
                    wrong.append((name, f"not built through {item.__name__}", sorted({c.__name__ for c in classes})))
                for x in items:
                    if item.from_json(x).to_json() != x:
                        wrong.append((name, "does not parse back to the same JSON"))
        assert {name for name, *_ in answers} == set(REPLIES)  # every call was made
        assert wrong == []
    finally:
        conn.close()


def test_the_client_reads_each_new_reply_through_its_class(smol):
    """The client reads causal_trace, attribution_patching, features, load_sae, saes, unload_sae,
    decode_many, expect and close through their classes: a field more or fewer, or of the wrong
    type, is a ProtocolError naming the call (never a KeyError in a caller), and the real reply
    reads as before."""
    import djinn_nb
    from djinn_nb.errors import ProtocolError
    from djinn_nb.notebook.patching import attribution_patching
    from djinn_nb.notebook.tracing import causal_trace

    server, sae_dir = smol
    client = djinn_nb.connect(f"127.0.0.1:{server.port}")
    clean, corrupted = [504, 26052, 28457, 314, 3216, 281], [504, 8941, 28457, 314, 3216, 281]
    doctors = [lambda r, key: {**r, "extra": 1}, lambda r, key: {k: v for k, v in r.items() if k != key},
               lambda r, key: {**r, key: "x" if not isinstance(r[key], str) else 3}]
    fresh = iter(range(1000, 2000))
    try:
        sae = client.load_sae(sae_dir, id="read")
        run = client.generate(clean, max_new_tokens=4, breakpoints=[(3, 0)])
        assert [s.id for s in client.saes()] == ["read"] and len(run.features(sae, k=3)) == len(clean)
        uses = {"load_sae": lambda: client.load_sae(sae_dir, id=f"s{next(fresh)}"), "saes": client.saes,
                "unload_sae": lambda: client.unload_sae(client.load_sae(sae_dir, id=f"s{next(fresh)}")),
                "features": lambda: run.features(sae, k=3),
                "decode_many": lambda: client.decode_many([[next(fresh)]]),
                "expect": lambda: client._tensor_in(torch.zeros(1 << 19)),
                "causal_trace": lambda: causal_trace(client, clean, corrupted, layers=[0], progress=False),
                "attribution_patching": lambda: attribution_patching(client, clean, corrupted, layers=[0]),
                "close": lambda: client.generate(clean, max_new_tokens=1).close()}
        keys = {"load_sae": "layer", "saes": "layer", "unload_sae": "id", "features": "ids", "decode_many": "sequences",
                "expect": "port", "causal_trace": "rows", "attribution_patching": "metric", "close": "id"}
        for name, use in uses.items():
            real = client._remote(name)
            for doctor in doctors:
                def doctored(*a, real=real, doctor=doctor, key=keys[name]):
                    result = reply(real(*a))["result"]
                    bad = [doctor(r, key) for r in result] if type(result) is list else doctor(result, key)
                    return wire.dumps({"ok": True, "result": bad})
                client._methods[name] = doctored
                with pytest.raises(ProtocolError, match=name):
                    use()
            del client._methods[name]
        assert run.state == "paused" and [s.id for s in client.saes()][0] == "read" and len(client.saes()) == 4
        frame = causal_trace(client, clean, corrupted, layers=[0, 1], positions=[0, 1], progress=False)
        assert frame.shape == (2, 2) and frame.attrs["answer_text"] is not None
        run.close()
        assert run.state == "closed" and run.id not in [r["id"] for r in client.runs()]
    finally:
        client.close()
