"""The steering slider: each value forks the checkpoint; fast moves do not pile up; forks are closed."""
from __future__ import annotations

import html
import threading

import pytest

import djinn_nb
from djinn_nb.notebook.widgets import SteeringWidget

PROMPT = [11, 22, 33, 44, 55, 66]


@pytest.fixture(scope="module")
def client():
    c = djinn_nb.connect(model="random:gpt2-tiny")
    yield c
    c.close()


@pytest.fixture
def paused(client):
    run = client.generate(PROMPT, max_new_tokens=8, breakpoints=[6])
    yield run
    run.close()


@pytest.fixture
def widget(client, paused):
    w = SteeringWidget(client, paused, min=0.0, max=3.0, step=0.25)
    yield w
    w.close()


def _expected(run, scale):
    with run.fork(scale=scale, breakpoints=[]) as f:
        return f.token_ids


def test_slider_is_float_and_not_continuous(widget):
    import ipywidgets

    assert isinstance(widget.slider, ipywidgets.FloatSlider)
    assert widget.slider.continuous_update is False
    assert (widget.slider.min, widget.slider.max, widget.slider.step, widget.slider.value) == (0.0, 3.0, 0.25, 1.0)
    assert "baseline (unmodified)" in widget.output.value
    assert "application/vnd.jupyter.widget-view+json" in widget._repr_mimebundle_()


def test_setting_slider_value_shows_that_forks_text(client, paused, widget):
    for value in (0.0, 2.5, 0.75):
        widget.slider.value = value
        result = widget.wait()
        expected = _expected(paused, value)
        assert result.scale == value and result.token_ids == expected
        for t in expected:
            assert html.escape(f"#{t}") in widget.output.value
        assert f"scale {value:.3g}" in widget.output.value
        assert "fork latency" in widget.output.value and result.latency_ms > 0
    assert widget.baseline_ids == _expected(paused, 1.0)
    assert paused.refresh().paused and paused.layer == 6  # the checkpoint is untouched


def test_changed_tokens_are_highlighted(paused, widget):
    result = widget.set(0.0)
    changed = [i for i, (a, b) in enumerate(zip(widget.baseline_ids, result.token_ids)) if a != b]
    assert changed, "zeroing layer 6's output changes the continuation"
    from djinn_nb.notebook.compare import changed_positions

    assert widget.output.value.count("background:#ffe08a") == sum(changed_positions(widget.baseline_ids, result.token_ids))


def test_fast_moves_run_only_the_latest_value(client, paused, widget):
    calls, gate, started = [], threading.Event(), threading.Event()
    real_fork_many = paused.fork_many  # what the slider forks with (widgets.forks_at)

    def slow_fork_many(edits):
        calls.extend(e.get("scale") for e in edits)
        started.set()
        gate.wait(30)
        return real_fork_many(edits)

    paused.fork_many = slow_fork_many
    try:
        widget.slider.value = 0.25
        assert started.wait(30)
        for v in (0.5, 0.75, 1.25, 1.5, 1.75, 2.0, 2.25):
            widget.slider.value = v
        gate.set()
        result = widget.wait()
    finally:
        del paused.fork_many
    assert calls == [0.25, 2.25]
    assert result.scale == 2.25 and result.token_ids == _expected(paused, 2.25)
    assert [r.scale for r in widget.results] == [0.25, 2.25]


def test_forks_are_closed(client, paused):
    before = {r["id"] for r in client.runs()}  # the embedded server is shared within the process
    assert paused.id in before
    w = SteeringWidget(client, paused)
    try:
        for v in (0.5, 1.5, 2.0, 0.5):
            w.set(v)
    finally:
        w.close()
    assert {r["id"] for r in client.runs()} == before


def test_a_slider_whose_run_is_gone_disables_itself_and_others_keep_working(client, widget):
    """Issue 12, item 6: a closed (or resumed) run's slider is disabled with the reason shown,
    instead of printing "fork ... failed" on every move."""
    other = client.generate(PROMPT, max_new_tokens=8, breakpoints=[6])
    w = SteeringWidget(client, other)
    try:
        other.close()
        assert w.set(0.5) is None
        assert w.slider.disabled and "slider disabled: run" in w.status.value and "is closed" in w.status.value
        assert "failed" not in w.status.value and w.results == []
    finally:
        w.close()
    assert widget.set(0.5).scale == 0.5


def test_a_slider_whose_run_was_closed_on_the_server_disables_itself(client):
    other = client.generate(PROMPT, max_new_tokens=8, breakpoints=[6])
    w = SteeringWidget(client, other)
    try:
        client.attach(other.id).close()  # another handle: this Run object still says paused
        assert other.paused
        assert w.set(0.5) is None
        assert w.slider.disabled and "gone from the server" in w.status.value
    finally:
        w.close()


def test_needs_a_paused_run(client):
    done = client.generate(PROMPT, max_new_tokens=2)
    with pytest.raises(ValueError, match="needs a paused run"):
        SteeringWidget(client, done)
