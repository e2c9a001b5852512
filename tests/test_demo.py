"""``make demo``'s walk-through: its "tokens changed" is the slider's (one definition, aligned), and it
ends with the resumed run equal to the unpaused one."""
from __future__ import annotations

import re

import djinn_nb
from djinn_nb.demo import main
from djinn_nb.notebook.compare import Comparison, tokens_changed

PROMPT = "The capital of France is"


def test_the_demo_counts_changed_tokens_as_the_slider_does(capsys):
    assert main(["--prompt", PROMPT]) == 0
    out = capsys.readouterr().out
    shown = {float(f): (int(c), int(t)) for f, c, t in
             re.findall(r"x([\d.]+)\s+-> .*\((\d+) of (\d+) tokens changed, aligned as the slider does", out)}
    assert set(shown) == {0.9, 0.5, 1.5}, out
    client = djinn_nb.connect()
    layer = client.info["num_layers"] // 3
    plain = client.generate(PROMPT, max_new_tokens=12)
    run = client.generate(PROMPT, max_new_tokens=12, breakpoints=[layer])
    for factor, counted in shown.items():
        with run.fork(scale=factor) as fork:
            assert tokens_changed(plain.token_ids, fork.token_ids) == counted, factor
            slider = Comparison(plain.token_ids, [], fork.token_ids, [], "fork")
            assert (slider.changed, slider.total) == counted  # what the slider's summary says
    assert "Identical to the unpaused run: True." in out
    run.close()
    plain.close()


def test_tokens_changed_aligns_rather_than_comparing_positions():
    base = [1, 2, 3, 4, 5, 6]
    shifted = [9, 1, 2, 3, 4, 5]  # one token inserted in front, the last one lost
    assert tokens_changed(base, shifted) == (2, 7)
    from djinn_nb.notebook.metrics import token_change_rate

    assert token_change_rate(base, shifted) == 1.0  # the study's positional rate counts every position
