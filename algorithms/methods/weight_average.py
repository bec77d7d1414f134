"""Weight averaging: τ_m = Σ wᵢ τᵢ / Σ wᵢ, θ = θ₀ + λ·τ_m.

With unit weights this is the plain mean of the experts (Wortsman et al. 2022, "Model soups"; the
benchmark's "Weight Average", PAPER.md Table 2/3). λ defaults to 1.0: averaging applies no scaling.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..base import Delta, MergeContext, as_sequence, dense
from ..chunks import scaled_add
from ..registry import in_range, register


@register(uses_weights=True, accepts_lowrank=False, streaming="elements", checks={"scale": in_range(0, None)},
          reference="Wortsman et al. 2022 (model soups); PAPER.md 'Weight Average'")
def weight_average(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext,
                   weights: Sequence[float] | None = None, scale: float = 1.0) -> torch.Tensor:
    """Mean of the experts (weighted by the recipe's expert weights): θ₀ + λ·Σwᵢτᵢ/Σwᵢ."""
    w = as_sequence(weights, len(deltas))
    total = sum(w)
    if total == 0:
        raise ValueError("weight_average: expert weights sum to zero")

    def mean() -> torch.Tensor:
        acc = torch.zeros_like(base)
        for wi, d in zip(w, deltas):
            acc.add_(dense(d), alpha=wi / total)
        return acc

    # The mean does not depend on λ (a sweep over scales computes it once); λ·τ_m + θ₀ has the bits of
    # θ₀ + λ·τ_m, in one new tensor.
    acc = ctx.remember(("weight_average", tuple(ctx.expert_id(i) for i in range(len(deltas))), tuple(w)), mean)
    return scaled_add(acc, scale, base, threads=ctx.threads, out_dtype=ctx.out_dtype)  # θ₀ + λ·τ_m, one new tensor
