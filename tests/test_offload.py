"""``core.offload``: a paused run's tensors packed into one host buffer per dtype and unpacked as
views. What must hold: every tensor comes back equal, in its place, with its shape and dtype,
from one buffer per dtype (the point of packing), whatever the mix of dtypes, shapes and
memory layouts; and the views alias the buffers (no hidden copies)."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from djinn_nb.core.offload import pack

DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.float16, torch.bool]


def _mixed() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(2, 3, 4, generator=g),                       # fp32
        torch.randint(0, 100, (5,), generator=g),                # int64
        torch.randn(4, 6, generator=g).to(torch.bfloat16).t(),   # bf16, non-contiguous
        torch.tensor(3.5),                                       # 0-dim fp32
        torch.randn(0, 8, generator=g),                          # empty fp32
        torch.randn(3, 3, generator=g)[:, 1],                    # fp32, strided view
        torch.rand(7, generator=g) > 0.5,                        # bool
    ]


def test_round_trip_is_exact_in_order_with_one_buffer_per_dtype():
    tensors = _mixed()
    hp = pack(tensors, pin=False)
    assert hp.count == len(tensors)
    assert sorted(str(g.buffer.dtype) for g in hp.groups) == sorted({str(t.dtype) for t in tensors})
    assert hp.nbytes == sum(t.numel() * t.element_size() for t in tensors)
    for original, back in zip(tensors, hp.host_views()):
        assert back.dtype == original.dtype and back.shape == original.shape
        assert torch.equal(back, original)
    for original, back in zip(tensors, hp.to_device(torch.device("cpu"))):
        assert torch.equal(back, original)


def test_pack_copies_and_views_alias_the_buffer():
    t = torch.arange(6, dtype=torch.float32)
    hp = pack([t], pin=False)
    t.zero_()  # the pack holds its own copy
    (view,) = hp.host_views()
    assert view.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    hp.groups[0].buffer[2] = 42.0  # and the views read the buffer, not a copy of it
    assert hp.host_views()[0][2] == 42.0
    assert view.data_ptr() == hp.groups[0].buffer.data_ptr()


def test_nothing_to_pack():
    hp = pack([], pin=False)
    assert hp.count == 0 and hp.nbytes == 0 and hp.host_views() == []


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3)), max_size=12))
def test_any_mix_of_dtypes_and_shapes_round_trips(specs):
    g = torch.Generator().manual_seed(len(specs))
    tensors = [(torch.rand(shape, generator=g) * 100).to(dtype) for dtype, shape in specs]
    back = pack(tensors, pin=False).host_views()
    assert len(back) == len(tensors)
    assert all(b.dtype == t.dtype and b.shape == t.shape and torch.equal(b, t) for b, t in zip(back, tensors))
