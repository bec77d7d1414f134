"""Task arithmetic: θ = θ₀ + λ·Σ wᵢ τᵢ (Ilharco et al. 2023, "Editing models with task arithmetic").

λ = ``scale`` defaults to 1.0 (mergekit's default for its weights; the paper searched
{0.1, 0.3, 0.5, 0.7, 1.0, 1.5}, ALGORITHMS.md). Expert weights multiply each task vector, as in mergekit.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..base import Delta, MergeContext, as_sequence, dense
from ..chunks import scaled_add
from ..registry import register


@register(uses_weights=True, streaming="elements", reference="Ilharco et al. 2023, arXiv 2212.04089")
def task_arithmetic(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext,
                    weights: Sequence[float] | None = None, scale: float = 1.0) -> torch.Tensor:
    """Sum of the (weighted) task vectors added to the base: θ₀ + λ·Σwᵢτᵢ."""
    w = as_sequence(weights, len(deltas))

    def weighted_sum() -> torch.Tensor:
        # 0 + w₀τ₀ without a tensor of zeros: w₀·τ₀ + 0.0 has its bits (−0 becomes +0 alike), then Σ in order;
        # with w₀ = 1 the product is τ₀ itself (one pass fewer).
        first = dense(deltas[0])
        acc = torch.add(first, 0.0) if w[0] == 1.0 else torch.mul(first, w[0]).add_(0.0)
        for wi, d in zip(w[1:], deltas[1:]):
            acc.add_(dense(d), alpha=wi)
        return acc

    # Σwᵢτᵢ does not depend on λ: a sweep over scales computes it once. λ·acc + θ₀ has the bits of θ₀ + λ·acc
    # (float multiplication and addition are commutative), in one new tensor.
    key = ("task_arithmetic", tuple(ctx.expert_id(i) for i in range(len(deltas))), tuple(w))
    acc = ctx.remember(key, weighted_sum)
    return scaled_add(acc, scale, base, threads=ctx.threads, out_dtype=ctx.out_dtype)  # θ₀ + λ·τ_m, one new tensor
