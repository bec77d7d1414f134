"""The non-finite check: cheap when clean, exact when not, never fooled by a float32 overflow of finite values."""

from __future__ import annotations

import pytest
import torch

from omnimerge.engine.errors import NonFiniteError
from omnimerge.engine.shard_runs import check_finite


def test_finite_values_whose_sum_overflows_pass():
    t = torch.full((4,), 3.0e38)  # each finite; their float32 sum is inf
    assert not torch.isfinite(t.sum())
    check_finite(t, "w", "expert 'a'")  # no error


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_named_and_counted(bad):
    t = torch.zeros(3, 3)
    t[1, 2] = bad
    t[0, 0] = bad
    with pytest.raises(NonFiniteError, match=r"Tensor 'w' of expert 'a' holds 2 non-finite value\(s\)"):
        check_finite(t, "w", "expert 'a'")
