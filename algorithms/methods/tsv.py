"""TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model
Merging", CVPR 2025, arXiv 2412.00081) — the real TSV-M, per 2-D task vector.

With N experts and an m×n tensor, r = ⌊min(m, n)/N⌋:

1. τᵢ = Uᵢ Σᵢ Vᵢᵀ; keep the top r components of each (fewer if τᵢ has lower numerical rank: singular
   values ≤ σ_max·max(m, n)·eps are rounding noise with arbitrary vectors and are dropped);
2. concatenate U = [U₁,r … U_N,r] (m×Σr), s = [σ₁,r … σ_N,r], V = [V₁,r … V_N,r] (n×Σr);
3. orthogonalise U and V by their polar factors (X = PΣQᵀ → PQᵀ);
4. τ_m = U⊥ diag(s) V⊥ᵀ, θ = θ₀ + λ·τ_m.

The paper's Qwen/InternVL scripts guard this with ``== 'lm_head.weight'`` and so compute a scaled mean
instead (ALGORITHMS.md); this is the method they meant. LowRank (LoRA) task vectors are decomposed in
factored form (QR of B and Aᵀ plus an r×r SVD). Tensors that are not 2-D use the fallback
(``weight_average``: the mean, as in the paper's code). Recipe weights are not used.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..base import Delta, MergeContext
from ..lowrank import expert_svd, numerical_rank, polar, require_2d
from ..registry import register

__all__ = ["tsv"]


@register(handles="2d", fallback="weight_average", accepts_lowrank=True,
          reference="Gargiulo et al. 2025, arXiv 2412.00081 (TSV-M)")
def tsv(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext, weights: Sequence[float] | None = None,
        scale: float = 1.0) -> torch.Tensor:
    """Task Singular Vectors merge: top-⌊min(m,n)/N⌋ SVD components per expert, orthogonalised.

    Default λ = ``scale`` 1.0 (the paper's LLaMA-Factory ``merge_models`` default scaling_coefficient).
    """
    require_2d("tsv", base)
    m, n = base.shape
    r = min(m, n) // len(deltas)
    us, ss, vs = [], [], []
    for i, d in enumerate(deltas):
        u, s, v = expert_svd(ctx, i, d)
        k = min(r, numerical_rank(s, (m, n)))
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(v[:, :k])
    s_cat = torch.cat(ss)
    if s_cat.numel() == 0:
        return base.clone()
    u_orth = polar(torch.cat(us, dim=1))
    v_orth = polar(torch.cat(vs, dim=1))
    merged = (u_orth * s_cat) @ v_orth.T
    return base + scale * merged
