"""``core.specs``: every way a breakpoint, a sampling setting or an edit can be written, and every
way it can be wrong. These arrive from the wire, so a bad one must fail here with a message that
says what to write instead, never reach the engine."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from djinn_nb.core.specs import Breakpoint, Edit, Sampling, parse_breakpoint, parse_breakpoints
from djinn_nb.errors import BadRequestError, BreakpointError


@pytest.mark.parametrize("spec, want", [
    (6, Breakpoint(6, 0)),
    ((6, 3), Breakpoint(6, 3)),
    ([6, "all"], Breakpoint(6, None)),
    ((6, None), Breakpoint(6, None)),
    ({"layer": 6}, Breakpoint(6, 0)),
    ({"layer": 6, "step": "ALL"}, Breakpoint(6, None)),
    ("6:3", Breakpoint(6, 3)),
    (" 6 : all ", Breakpoint(6, None)),
    ("6", Breakpoint(6, 0)),
])
def test_every_written_form_parses(spec, want):
    assert parse_breakpoint(spec) == want


@pytest.mark.parametrize("spec, message", [
    (6.5, "breakpoint layer must be an integer"),
    (True, "breakpoint layer must be an integer"),
    ((6, 1.0), "breakpoint step must be an integer"),
    ((1, 2, "resid_post", 4), r"a breakpoint is \(layer, step\)"),
    ({"layer": 6, "stp": 2}, "takes 'layer' and optional 'step'"),
    ({"step": 2}, "takes 'layer' and optional 'step'"),
    ("six", "breakpoint layer must be an integer"),
    (2 ** 40, "breakpoint layer must be an integer"),
])
def test_malformed_breakpoints_are_refused_with_what_was_wrong(spec, message):
    with pytest.raises(BreakpointError, match=message):
        parse_breakpoint(spec)


def test_ranges_are_checked_against_the_model_and_the_generation():
    with pytest.raises(BreakpointError, match=r"layer 12 is out of range: this model has layers 0..11"):
        parse_breakpoints([12], num_layers=12, max_new_tokens=4)
    with pytest.raises(BreakpointError, match=r"layer -1 is out of range"):
        parse_breakpoints([-1], num_layers=12, max_new_tokens=4)
    with pytest.raises(BreakpointError, match=r"step 4 is out of range: max_new_tokens=4 gives steps 0..3"):
        parse_breakpoints([(3, 4)], num_layers=12, max_new_tokens=4)
    assert parse_breakpoints([(3, "all")], num_layers=12, max_new_tokens=1) == (Breakpoint(3, None),)


def test_a_list_collapses_duplicates_and_orders_by_layer_then_step():
    got = parse_breakpoints([9, (3, 2), "3:all", 9, {"layer": 3, "step": 0}], num_layers=12, max_new_tokens=4)
    assert got == (Breakpoint(3, None), Breakpoint(3, 0), Breakpoint(3, 2), Breakpoint(9, 0))
    assert parse_breakpoints(None, 12, 4) == () and parse_breakpoints(5, 12, 4) == (Breakpoint(5, 0),)
    with pytest.raises(BreakpointError, match="must be a list"):
        parse_breakpoints(5.0, 12, 4)


def test_steps_covered_and_wire_form():
    every = Breakpoint(4, None)
    assert every.covers(0) and every.covers(7)
    assert Breakpoint(4, 2).covers(2) and not Breakpoint(4, 2).covers(3)
    assert every.as_dict()["layer"] == 4 and every.as_dict()["step"] == "all"
    assert parse_breakpoint(every.as_dict()) == every  # what goes out parses back


@given(st.integers(0, 10 ** 6), st.one_of(st.none(), st.integers(0, 10 ** 6)))
def test_every_breakpoint_survives_its_string_and_dict_forms(layer, step):
    bp = Breakpoint(layer, step)
    text = f"{layer}:{'all' if step is None else step}"
    assert parse_breakpoint(text) == bp == parse_breakpoint(bp.as_dict())


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ({"temperature": True}, "temperature must be a finite number >= 0"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"top_k": 2.0}, "top_k must be an integer >= 0"),
    ({"seed": -1}, "seed must be an integer in 0..2\\*\\*63-1"),
    ({"seed": 2 ** 63}, "seed must be an integer in 0..2\\*\\*63-1"),
])
def test_bad_sampling_is_refused(kwargs, message):
    with pytest.raises(BadRequestError, match=message):
        Sampling(**kwargs)


def test_good_sampling_and_empty_edits():
    assert Sampling() == Sampling(0.0, 0, 0) and Sampling(0.7, 40, 2 ** 63 - 1).top_k == 40
    assert Edit().empty
    assert not Edit(scale=1.0).empty and not Edit(add=torch.zeros(3)).empty and not Edit(original=True).empty
