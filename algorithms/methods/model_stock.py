"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
arXiv 2403.19522; mergekit ``model_stock``).

With N ≥ 2 experts and task vectors τᵢ (the offsets of θᵢ from the base θ₀): cos Ω is the mean of the
pairwise cosines cos(τᵢ, τⱼ), i < j (mergekit's reading of the paper for N > 2), the interpolation
ratio is

    t = N·cos Ω / (1 + (N − 1)·cos Ω),   θ = t·mean(θᵢ) + (1 − t)·θ₀ = θ₀ + t·mean(τᵢ).

``filter_wise: true`` computes cos Ω and t per row (last dimension; a 1-D tensor is one row), as
mergekit. A zero task vector has cosine 0 with everything (mergekit instead clamps ‖τᵢ‖‖τⱼ‖ at 1e-6,
which shrinks the cosine of small task vectors); t is 0 where 1 + (N − 1)cos Ω = 0. Recipe weights are
not used (as in mergekit).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..base import Delta, MergeContext, dense
from ..registry import register

__all__ = ["model_stock"]


@register(min_experts=2, reference="Jang et al. 2024, arXiv 2403.19522; mergekit 'model_stock'")
def model_stock(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext,
                weights: Sequence[float] | None = None, filter_wise: bool = False) -> torch.Tensor:
    """θ₀ + t·mean(τᵢ), t from the mean pairwise angle between task vectors.

    Default filter_wise false (mergekit's default: one ratio per tensor).
    """
    n_exp = len(deltas)
    if n_exp < 2:
        raise ValueError(f"model_stock needs at least 2 experts, got {n_exp}")
    xs = [dense(d) for d in deltas]
    if filter_wise:
        rows = [x.reshape(1, -1) if x.dim() < 2 else x.reshape(-1, x.shape[-1]) for x in xs]
    else:
        rows = [x.reshape(1, -1) for x in xs]
    norms = [torch.linalg.vector_norm(r, dim=-1) for r in rows]
    cos_sum = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(n_exp):
        for j in range(i + 1, n_exp):
            prod = norms[i] * norms[j]
            dot = (rows[i] * rows[j]).sum(dim=-1)
            cos = torch.where(prod > 0, dot / torch.where(prod > 0, prod, torch.ones_like(prod)), torch.zeros_like(prod))
            cos_sum += cos.clamp(-1.0, 1.0)
            pairs += 1
    cos = cos_sum / pairs
    denom = 1.0 + (n_exp - 1) * cos
    ratio = torch.where(denom != 0, n_exp * cos / torch.where(denom != 0, denom, torch.ones_like(denom)),
                        torch.zeros_like(denom))
    mean = torch.stack(xs).mean(dim=0)
    if filter_wise and base.dim() >= 2:
        shaped = ratio.reshape(*base.shape[:-1], 1)
    else:
        shaped = ratio.reshape(())
    return base + shaped * mean
