"""DARE hosted by TIES (the paper's "TIES + DARE"; mergekit's ``dare_ties``).

Per tensor: τ̃ᵢ = DARE(τᵢ; p) with rescaling by 1/(1 − p) (seeded per tensor and expert, see
``dare_linear``), then TIES on the τ̃ᵢ: trim each to its top ⌊density·numel⌋ magnitudes (ties kept),
elect γ = sign(Σ wᵢτ̂ᵢ) (0 → sign of Σγ over the tensor), and take the disjoint (weighted) mean of the
agreeing entries; θ = θ₀ + λ·τ_m.

Paper defaults: p 0.2 and TIES density 0.2 (the script DAREs first, then calls ``ties_merging`` with mask
rate 0.8), disjoint mean. mergekit's ``dare_ties`` has no magnitude trim and sums without dividing: a
mergekit recipe with ``density: d`` maps to ``p: 1 − d, density: 1.0, normalize: false`` here.
The trim is per tensor (``ties`` offers the model-wide scope).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..base import Delta, MergeContext, as_sequence
from ..consensus import ties_consensus
from ..registry import in_range, register
from ..selection import keep_count, kth_largest_magnitude, magnitude_histogram
from .dare_linear import dare_deltas

__all__ = ["dare_ties"]


@register(uses_weights=True, random=True, one_thread=True,
          checks={"p": in_range(0, 1, high_open=True), "density": in_range(0, 1, low_open=True)},
          reference="Yu et al. 2024, arXiv 2311.03099 + Yadav et al. 2023, arXiv 2306.01708; mergekit 'dare_ties'")
def dare_ties(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext,
              weights: Sequence[float] | None = None, p: float = 0.2, density: float = 0.2, rescale: bool = True,
              normalize: bool = True, scale: float = 1.0) -> torch.Tensor:
    """DARE (drop p, rescale) then TIES (trim to density, elect, disjoint mean): θ₀ + λ·τ_m.

    Defaults: p 0.2 and density 0.2 (paper code, ALGORITHMS.md); rescale true (DARE paper); normalize
    true (paper's disjoint mean); λ = ``scale`` 1.0 (paper searched {0.1, …, 1.5}).
    """
    sparse = dare_deltas(deltas, ctx=ctx, p=p, rescale=rescale)
    thresholds = None
    if density < 1.0:
        thresholds = [kth_largest_magnitude(d, magnitude_histogram(d, threads=ctx.threads), keep_count(density, d.numel()),
                                            threads=ctx.threads) for d in sparse]
    merged = ties_consensus(sparse, as_sequence(weights, len(deltas)), normalize=normalize, thresholds=thresholds,
                            threads=ctx.threads)
    return base + scale * merged
