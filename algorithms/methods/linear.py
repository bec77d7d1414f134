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


@register(uses_weights=True, reference="mergekit 'linear' (Goddard et al. 2024, arXiv 2403.13257)")
def linear(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext,
           weights: Sequence[float] | None = None, normalize: bool = True, include_base: bool = False,
           base_weight: float = 1.0) -> torch.Tensor:
    """Weighted average of the full expert weights θᵢ = θ₀ + τᵢ (optionally with θ₀ itself)."""
    w = as_sequence(weights, len(deltas))
    models = [base + dense(d) for d in deltas]
    if include_base:
        models.append(base)
        w.append(float(base_weight))
    total = sum(w)
    if normalize and total == 0:
        raise ValueError("linear: weights sum to zero; set normalize: false or give non-zero weights")
    acc = torch.zeros_like(base)
    for wi, m in zip(w, models):
        acc.add_(m, alpha=wi / total if normalize else wi)
    return acc
