"""Task arithmetic: θ = θ₀ + λ·Σ wᵢ τᵢ (Ilharco et al. 2023, "Editing models with task arithmetic").

λ = ``scale`` defaults to 1.0 (mergekit's default for its weights; the paper searched
{0.1, 0.3, 0.5, 0.7, 1.0, 1.5}, ALGORITHMS.md). Expert weights multiply each task vector, as in mergekit.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..base import Delta, MergeContext, as_sequence, dense
from ..registry import register


@register(uses_weights=True, reference="Ilharco et al. 2023, arXiv 2212.04089")
def task_arithmetic(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext,
                    weights: Sequence[float] | None = None, scale: float = 1.0) -> torch.Tensor:
    """Sum of the (weighted) task vectors added to the base: θ₀ + λ·Σwᵢτᵢ."""
    acc = torch.zeros_like(base)
    for wi, d in zip(as_sequence(weights, len(deltas)), deltas):
        acc.add_(dense(d), alpha=wi)
    return base + scale * acc
