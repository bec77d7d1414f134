"""TIES sign election and disjoint merge, shared by every TIES host (ties, dare_ties, della).

Given (already sparsified) task vectors τ̂ᵢ and recipe weights wᵢ (mergekit multiplies each τ̂ᵢ by wᵢ
before electing, ``generalized_task_arithmetic.py``):

- elect  γ = sign(Σᵢ wᵢτ̂ᵢ) per entry — the sign of the mass, not a vote (Yadav et al. 2023, §3);
  where that sum is exactly 0, γ = sign(Σ γ) over the whole tensor (the TIES paper code's
  ``majority_sign``; mergekit uses +1 instead). If that is 0 too, the entry elects nothing (output 0).
- merge  τ_m = Σ_{i: sign(wᵢτ̂ᵢ)=γ} wᵢτ̂ᵢ / Σ_{i: sign(wᵢτ̂ᵢ)=γ} wᵢ, the divisor replaced by 1 where no
  expert agrees (or where ``normalize`` is false, mergekit's ``normalize: false``).

With unit weights the divisor is the count of non-zero agreeing entries, clamped to ≥ 1: exactly the
paper's disjoint mean.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["elect_sign", "disjoint_merge", "ties_merge"]


def elect_sign(weighted: Sequence[torch.Tensor]) -> torch.Tensor:
    """γ ∈ {−1, 0, +1} per entry from the weighted, sparsified task vectors (see module docstring)."""
    # Σ from the first term on (no zeros to start from): only the sign of an exactly-zero sum can differ
    # from a sum started at +0, and those entries take the tensor-wide sign below either way.
    total = weighted[0].clone() if len(weighted) == 1 else torch.add(weighted[0], weighted[1])
    for x in weighted[2:]:
        total.add_(x)
    gamma = torch.sign(total)
    zero = gamma == 0
    if bool(zero.any()):
        gamma = torch.where(zero, torch.sign(gamma.sum()), gamma)
    return gamma


def disjoint_merge(weighted: Sequence[torch.Tensor], weights: Sequence[float], gamma: torch.Tensor, *,
                   normalize: bool = True) -> torch.Tensor:
    """Σ of the agreeing wᵢτ̂ᵢ, divided (``normalize``) by the Σ of the agreeing wᵢ (1 where none agree)."""
    zero = torch.zeros((), dtype=gamma.dtype, device=gamma.device)
    num: torch.Tensor | None = None
    den = torch.zeros_like(gamma)
    for x, w in zip(weighted, weights):
        # sign(x) = γ ≠ 0  ⟺  x·γ > 0 (γ ∈ {−1, 0, +1}: the product is ±x or ±0, exactly)
        agree = torch.mul(x, gamma) > 0
        part = torch.where(agree, x, zero)
        num = part if num is None else num.add_(part)  # +0 + part = part: the sum started at zeros, bit for bit
        den.add_(agree, alpha=float(w))
    if num is None:
        return torch.zeros_like(gamma)
    if not normalize:
        return num
    return num.div_(den.masked_fill_(den == 0, 1.0))


def ties_merge(sparse: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True) -> torch.Tensor:
    """Elect and disjoint-merge already sparsified task vectors τ̂ᵢ with weights wᵢ → τ_m."""
    weighted = [x if w == 1.0 else x * float(w) for x, w in zip(sparse, weights)]
    gamma = elect_sign(weighted)
    return disjoint_merge(weighted, weights, gamma, normalize=normalize)
