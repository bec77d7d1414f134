"""Iso-CTS: isotropic merging in common and task-specific subspaces (Marczak et al. 2025, "No Task Left
Behind", arXiv 2502.04959, Algorithm 2; official code ``danielm1405/iso-merging``).

Per 2-D m×n tensor with N experts and d = min(m, n):

1. sizes: k = ⌊f·d⌋ with f = ``common_space_fraction``; the task-specific total is rounded to a
   multiple of N, t = round((d − k)/N)·N; then k = d − t and each expert gets s = t/N directions;
2. common subspace: Δ = Σ τᵢ = U Σ Vᵀ, keep U_k, σ_k, V_k;
3. task-specific: τᵢ' = τᵢ − U_k U_kᵀ τᵢ (common part projected out), keep its top-s SVD components;
4. concatenate [U₁' … U_N', U_k] and [V₁' … V_N', V_k] and the singular values, orthogonalise U and V
   by their polar factors, replace every singular value by their mean σ̄:
   τ_m = σ̄·U⊥ V⊥ᵀ, θ = θ₀ + λ·τ_m.

When the experts' task-specific directions are (nearly) parallel — e.g. low-rank experts whose summed
rank only slightly exceeds k, so every residual lies in the same few directions — the orthogonalisation
is ill-conditioned, here as in the official code; exactly parallel directions are merged by the
partial-isometry polar factor (:func:`~omnimerge.algorithms.lowrank.polar`). As in ``iso_c``, components with numerically zero singular values (arbitrary vectors) are left out,
which changes nothing for full-rank inputs and keeps LowRank and dense inputs equal. LowRank task
vectors stay factored throughout (the projection acts on B). Non-2-D tensors use the fallback
(``weight_average``, the official code's average). Recipe weights are not used.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..base import Delta, LowRank, MergeContext
from ..lowrank import combine, frobenius_sq, numerical_rank, polar, require_2d, svd
from ..registry import in_range, register

__all__ = ["iso_cts"]


def _project_out(delta: Delta, u: torch.Tensor) -> Delta:
    """(I − U Uᵀ)·Δ, keeping a LowRank factored."""
    if isinstance(delta, LowRank):
        B = delta.B.float()
        return LowRank(B - u @ (u.T @ B), delta.A, delta.scale)
    return delta - u @ (u.T @ delta)


@register(handles="2d", fallback="weight_average", accepts_lowrank=True,
          checks={"common_space_fraction": in_range(0, 1)},
          reference="Marczak et al. 2025, arXiv 2502.04959 (Iso-CTS)")
def iso_cts(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext,
            weights: Sequence[float] | None = None, common_space_fraction: float = 0.8,
            scale: float = 1.0) -> torch.Tensor:
    """Common subspace of Σ τᵢ plus each expert's own top directions, orthogonalised, isotropic spectrum.

    Defaults: common_space_fraction 0.8 (official ``config/method/iso_cts.yaml``); λ = ``scale`` 1.0
    (the paper tunes α on validation data; 1.0 leaves the merged update unscaled).
    """
    require_2d("iso_cts", base)
    m, n = base.shape
    d, N = min(m, n), len(deltas)
    k = int(d * common_space_fraction)
    task_total = round((d - k) / N) * N
    k = d - task_total
    per_task = task_total // N

    u, s, v = svd(combine(deltas, [1.0] * N))
    k = min(k, numerical_rank(s, (m, n)))
    u_c, s_c, v_c = u[:, :k], s[:k], v[:, :k]
    us, ss, vs = [], [], []
    for delta in deltas:
        ut, st, vt = svd(_project_out(delta, u_c))
        j = min(per_task, numerical_rank(st, (m, n), scale=frobenius_sq(delta).sqrt()))
        us.append(ut[:, :j])
        ss.append(st[:j])
        vs.append(vt[:, :j])
    us.append(u_c)
    ss.append(s_c)
    vs.append(v_c)
    s_all = torch.cat(ss)
    if s_all.numel() == 0:
        return base.clone()
    merged = (polar(torch.cat(us, dim=1)) * s_all.mean()) @ polar(torch.cat(vs, dim=1)).T
    return base + scale * merged
