"""Methods share λ-independent work through the sweep memo without changing a bit of their output."""

from __future__ import annotations

import torch

from omnimerge.algorithms import MergeContext, get_method


def test_ties_direction_computed_once_across_scales():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    deltas = [torch.randn(6, 5, generator=g) for _ in range(3)]
    ties = get_method("ties").fn
    memo: dict = {}
    shared = [ties(base, deltas, ctx=MergeContext("w", expert_ids=("a", "b", "c"), memo=memo), scale=s)
              for s in (0.5, 1.0)]
    alone = [ties(base, deltas, ctx=MergeContext("w", expert_ids=("a", "b", "c")), scale=s) for s in (0.5, 1.0)]
    assert len(memo) == 1  # one direction for both scales
    for x, y in zip(shared, alone):
        assert torch.equal(x, y)  # byte-identical to the unshared computation
    # A different density or expert set is a different direction.
    ties(base, deltas, ctx=MergeContext("w", expert_ids=("a", "b", "c"), memo=memo), density=0.5)
    ties(base, deltas[:2], ctx=MergeContext("w", expert_ids=("a", "b"), memo=memo))
    assert len(memo) == 3
