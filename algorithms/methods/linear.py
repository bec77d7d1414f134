"""Linear merge of full weights: θ = Σ wᵢ θᵢ / Σ wᵢ (mergekit's ``linear``, normalised by default).

Unlike ``weight_average`` the base takes part only if the recipe lists it among the models (mergekit
semantics): ``include_base`` adds θ₀ with weight ``base_weight``. With ``normalize: false`` the weights are
used as given (mergekit's ``normalize`` parameter, default true).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..base import Delta, MergeContext, as_sequence, dense
from ..registry import register


@register(uses_weights=True, streaming="elements", reference="mergekit 'linear' (Goddard et al. 2024, arXiv 2403.13257)")
def linear(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext,
           weights: Sequence[float] | None = None, normalize: bool = True, include_base: bool = False,
           base_weight: float = 1.0) -> torch.Tensor:
    """Weighted average of the full expert weights θᵢ = θ₀ + τᵢ (optionally with θ₀ itself)."""
    w = as_sequence(weights, len(deltas))
    total = sum(w) + (float(base_weight) if include_base else 0.0)
    if normalize and total == 0:
        raise ValueError("linear: weights sum to zero; set normalize: false or give non-zero weights")
    den = total if normalize else 1.0
    # Σ cᵢθᵢ = (Σ cᵢ)·θ₀ + Σ cᵢτᵢ: the same sum, written so that θ₀ passes through unrounded when the
    # coefficients sum to one (experts equal to the base give the base bit for bit).
    acc = torch.zeros_like(base)
    for wi, d in zip(w, deltas):
        acc.add_(dense(d), alpha=wi / den)
    base_coeff = total / den
    # acc + θ₀·c has the bits of θ₀·c + acc (addition is commutative), without another tensor.
    return acc.add_(base) if base_coeff == 1.0 else acc.add_(base * base_coeff)
