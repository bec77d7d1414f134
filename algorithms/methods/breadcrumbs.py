"""Model Breadcrumbs (Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
Sparse Masks", arXiv 2312.06795; mergekit ``breadcrumbs``).

Per tensor and expert, with n = numel: drop the ⌊γ·n⌋ largest |τᵢ| (outliers) and as many of the
smallest as needed to keep exactly ⌊density·n⌋ entries (ties broken by position;
:func:`~omnimerge.algorithms.sparsify.magnitude_outliers`), giving τ̃ᵢ; then τ_m = Σ wᵢτ̃ᵢ (divided by
Σ wᵢ when ``normalize``) and θ = θ₀ + λ·τ_m — mergekit's ``breadcrumbs`` (no sign consensus, no
rescaling, normalize false by default).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..base import Delta, MergeContext, as_sequence, dense
from ..registry import in_range, register
from ..sparsify import magnitude_outliers

__all__ = ["breadcrumbs"]


@register(uses_weights=True, one_thread=True, checks={"density": in_range(0, 1, low_open=True), "gamma": in_range(0, 1, high_open=True)},
          reference="Davari & Belilovsky 2023, arXiv 2312.06795; mergekit 'breadcrumbs'")
def breadcrumbs(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext,
                weights: Sequence[float] | None = None, density: float = 0.9, gamma: float = 0.01,
                normalize: bool = False, scale: float = 1.0) -> torch.Tensor:
    """Drop the top-γ outliers and the smallest entries (keep ⌊density·n⌋), then task arithmetic.

    Defaults: gamma 0.01 (mergekit's default, its docs' β); density 0.9 (chosen here: mergekit's
    default 1.0 would keep everything but the γ outliers); normalize false and λ = ``scale`` 1.0
    (mergekit's defaults).
    """
    w = as_sequence(weights, len(deltas))
    acc = torch.zeros_like(base)
    for wi, d in zip(w, deltas):
        acc.add_(magnitude_outliers(dense(d), density, gamma), alpha=wi)
    if normalize:
        total = sum(w)
        if abs(total) < 1e-8:
            raise ValueError("breadcrumbs: weights sum to zero; set normalize: false or give non-zero weights")
        acc.div_(total)
    return base + scale * acc
