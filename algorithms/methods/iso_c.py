"""Iso-C: isotropic merging in the common subspace (Marczak et al. 2025, "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", arXiv 2502.04959).

Per 2-D tensor: Δ = Σᵢ τᵢ = U diag(σ) Vᵀ; every singular value is replaced by their mean:
τ_m = mean(σ)·U Vᵀ, θ = θ₀ + λ·τ_m.

Only the numerically non-zero part of the spectrum is used (σ > σ_max·max(m, n)·eps): for a full-rank
Δ (any real full fine-tuning) this is the paper's formula exactly; for a rank-deficient Δ the dense
formula is not even well defined (the singular vectors of zero singular values are arbitrary), and
here the isotropic spectrum covers the subspace the experts span — which is also what a LowRank (LoRA)
sum Σ BᵢAᵢ gives when decomposed in factored form (it is, never densified). Non-2-D tensors use the
fallback (``weight_average``: the mean, the paper's code). Recipe weights are not used.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..base import Delta, MergeContext
from ..lowrank import combine, numerical_rank, require_2d, svd
from ..registry import register

__all__ = ["iso_c"]


@register(handles="2d", fallback="weight_average", accepts_lowrank=True,
          reference="Marczak et al. 2025, arXiv 2502.04959 (Iso-C)")
def iso_c(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext, weights: Sequence[float] | None = None,
          scale: float = 1.0) -> torch.Tensor:
    """Sum the task vectors, flatten the spectrum to its mean: θ₀ + λ·mean(σ)·U Vᵀ.

    Default λ = ``scale`` 1.0 (ALGORITHMS.md: λ only; the paper's LLaMA-Factory default coefficient).
    """
    require_2d("iso_c", base)
    u, s, v = svd(combine(deltas, [1.0] * len(deltas)))
    k = numerical_rank(s, base.shape)
    if k == 0:
        return base.clone()
    merged = (u[:, :k] * s[:k].mean()) @ v[:, :k].T
    return base + scale * merged
