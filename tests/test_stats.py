"""activation_stats: the statistics every step reply carries, against torch's own reductions."""
from __future__ import annotations

import math

import pytest
import torch

from djinn_nb.core.runs import activation_stats


@pytest.mark.parametrize("shape", [(1, 6, 64), (1, 1, 576), (1, 5, 4, 16), (7, 32), (3, 4, 8)])
def test_statistics_equal_torch_reductions(shape):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    f = t.float()
    per_pos = f[0].reshape(f.shape[1], -1) if f.dim() >= 3 else f.reshape(-1, f.shape[-1])
    s = activation_stats(t)
    want = {"norm": f.norm(), "mean": f.mean(), "std": f.std(), "max": f.max(), "min": f.min()}
    for k, v in want.items():
        assert s[k] == pytest.approx(float(v), rel=1e-5, abs=1e-6), k
    assert s["position_norm"] == pytest.approx(per_pos.norm(dim=-1).tolist(), rel=1e-5)
    assert s["position_mean"] == pytest.approx(per_pos.mean(dim=-1).tolist(), rel=1e-5, abs=1e-6)
    assert s["position_max"] == per_pos.amax(dim=-1).tolist()
    assert activation_stats(t.bfloat16())["max"] == float(t.bfloat16().max())


def test_a_single_value_and_non_finite_values():
    one = activation_stats(torch.tensor([[[2.0]]]))
    assert (one["norm"], one["mean"], one["std"], one["max"], one["min"]) == (2.0, 2.0, 0.0, 2.0, 2.0)
    t = torch.ones(1, 3, 4)
    t[0, 1, 2] = float("nan")
    s = activation_stats(t)
    assert math.isnan(s["max"]) and math.isnan(s["min"]) and math.isnan(s["norm"])
    assert math.isnan(s["position_max"][1]) and s["position_max"][0] == 1.0
