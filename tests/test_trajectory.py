"""A run's history has one owner: records appended per step, taken back to any mark (the conditional
replay and the NaN guard), copied for a fork and cropped for a rewind."""
from __future__ import annotations

import torch

from djinn_nb.core.trajectory import Trajectory, WatchHit


def step(t: Trajectory, token: int, logits: float, keep: bool = True, watch_step: int | None = None) -> None:
    row = torch.full((4,), logits)
    t.record_generator(torch.tensor([token]))
    t.record_distribution(row, [(token, -0.1)], 0.5 + token, keep)
    t.record_token(token, 100.0 + token)
    if watch_step is not None:
        t.record_watch(WatchHit(1, watch_step, "resid_post", row))


def test_undo_takes_every_record_back_to_the_mark():
    t = Trajectory()
    step(t, 1, 1.0, watch_step=0)
    mark = t.mark()
    step(t, 2, 2.0, watch_step=1)
    step(t, 3, 3.0, keep=False, watch_step=2)
    assert t.token_ids == [1, 2, 3] and len(t.logits) == 2 and float(t.last_logits[0]) == 3.0
    t.undo(mark)
    assert t.token_ids == [1] and [e for e in t.entropies] == [1.5] and t.topk == [[(1, -0.1)]]
    assert t.token_times == [101.0] and len(t.gen_states) == 1 and len(t.logits) == 1 and len(t.watch_log) == 1
    assert float(t.last_logits[0]) == 1.0  # the latest logits as they were at the mark
    t.undo(t.mark())  # a mark of now changes nothing
    assert t.token_ids == [1]


def test_a_fork_copies_the_records_untimed_and_apart():
    t = Trajectory()
    step(t, 1, 1.0, watch_step=0)
    f = t.forked()
    assert f.token_ids == [1] and f.token_times == [] and f.last_logits is None and len(f.watch_log) == 1
    step(f, 2, 2.0)
    assert t.token_ids == [1] and len(t.topk) == 1  # the source is untouched


def test_a_rewind_keeps_the_steps_before_it_and_their_watches():
    t = Trajectory()
    for i in range(4):
        step(t, i, float(i), watch_step=i)
    r = t.cropped(2)
    assert r.token_ids == [0, 1] and len(r.topk) == len(r.entropies) == len(r.gen_states) == len(r.logits) == 2
    assert [h.step for h in r.watch_log] == [0, 1] and r.token_times == []
    assert float(r.last_logits[0]) == 1.0  # step 1's logits: what step 2 continues from
    assert t.cropped(0).last_logits is None and t.cropped(0).token_ids == []


def test_closing_frees_tensors_and_keeps_tokens():
    t = Trajectory()
    step(t, 1, 1.0, watch_step=0)
    t.drop_tensors()
    assert t.token_ids == [1] and t.logits == [] and t.watch_log == [] and t.last_logits is None


def test_the_last_step_can_be_taken_back_without_a_mark():
    t = Trajectory()
    step(t, 1, 1.0)
    step(t, 2, 2.0, keep=False)
    t.drop_last_step(sampled=True, kept_logits=False)
    assert t.token_ids == [1] and t.topk == [[(1, -0.1)]] and t.entropies == [1.5] and t.token_times == [101.0]
    assert len(t.gen_states) == 1 and len(t.logits) == 1
