"""Spectral helpers shared by the SVD-based methods (tsv, iso_c, iso_cts, wudi, optmerge).

Every helper takes a dense float32 matrix or a :class:`~omnimerge.algorithms.base.LowRank` and never
densifies the factored form just to decompose it: for ΔW = s·B·A (B: m×r, A: r×n) we take the reduced QR
factorisations B = Q_B R_B and Aᵀ = Q_A R_A, so ΔW = Q_B (s·R_B R_Aᵀ) Q_Aᵀ, and one r×r SVD of the core
s·R_B R_Aᵀ = U_c Σ V_cᵀ gives ΔW = (Q_B U_c) Σ (Q_A V_c)ᵀ — O((m+n)r²) instead of O(mn·min(m,n)).

Conventions: :func:`svd` returns ``(U, S, V)`` with ``U``: m×k, ``S``: k, ``V``: n×k (V, not Vᴴ) so that
ΔW = U diag(S) Vᵀ, singular values descending. Leading batch dimensions are allowed on dense inputs.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from .base import Delta, LowRank, MergeContext

__all__ = [
    "svd",
    "truncated",
    "numerical_rank",
    "polar",
    "frobenius_sq",
    "combine",
    "require_2d",
    "expert_svd",
]

logger = logging.getLogger(__name__)


def require_2d(method: str, delta: Delta | torch.Tensor) -> None:
    """Raise a ``ValueError`` naming ``method`` when ``delta`` is not a matrix (2-D-only methods)."""
    shape = tuple(delta.shape)
    if len(shape) != 2:
        raise ValueError(
            f"{method} merges 2-D weight matrices only, got a tensor of shape {list(shape)}. "
            f"The engine applies the method's fallback to other tensors; call that instead."
        )


def svd(delta: Delta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, S, V)`` of a dense matrix (or batch ``[..., m, n]``) or of a :class:`LowRank`.

    For a LowRank of rank r the result has k = min(r, m, n) components (the other singular values are
    exactly zero and their vectors are not unique, so they are not returned).
    """
    if isinstance(delta, LowRank):
        B = delta.B.float()
        A = delta.A.float()
        qb, rb = torch.linalg.qr(B)  # m×p, p×r   (p = min(m, r))
        qa, ra = torch.linalg.qr(A.transpose(-1, -2))  # n×q, q×r
        core = (rb @ ra.transpose(-1, -2)) * float(delta.scale)  # p×q
        uc, s, vch = torch.linalg.svd(core, full_matrices=False)
        return qb @ uc, s, qa @ vch.transpose(-1, -2)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u, s, vh.transpose(-1, -2)


def numerical_rank(s: torch.Tensor, shape: Sequence[int], scale: float | torch.Tensor | None = None) -> int:
    """Count of singular values above ``σ_ref · max(m, n) · eps(float32)`` (NumPy ``matrix_rank``'s rule).

    ``σ_ref`` is the largest singular value, or ``scale`` when larger — pass the norm of the matrix a
    residual came from (e.g. τ − UUᵀτ), so that a residual made only of rounding noise has rank 0
    instead of being measured against its own noise. Components below the tolerance are rounding noise:
    their singular vectors are arbitrary, so methods that orthogonalise or flatten a spectrum drop them
    to stay deterministic (and equal for dense and factored inputs).
    """
    if s.numel() == 0:
        return 0
    ref = max(float(s.max()), 0.0 if scale is None else float(scale))
    if ref == 0.0:
        return 0
    tol = ref * max(int(shape[-2]), int(shape[-1])) * torch.finfo(torch.float32).eps
    return int((s > tol).sum())


def truncated(delta: Delta, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` SVD factors ``(U_k, S_k, V_k)`` of ``delta`` (fewer if its rank is below ``k``)."""
    u, s, v = svd(delta)
    k = max(0, min(int(k), s.shape[-1]))
    return u[..., :k], s[..., :k], v[..., :k]


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of ``x`` (m×k): x = P Σ Qᵀ → P Qᵀ, the nearest matrix with
    orthonormal columns (used by TSV-M and Iso-CTS to orthogonalise concatenated singular vectors).

    When ``x`` is rank-deficient (e.g. two experts share a singular vector) only the numerically
    non-zero part is kept, P_r Q_rᵀ (a partial isometry): the rest of the polar factor would be an
    arbitrary completion, different on every device. For full-rank ``x`` this is the usual P Qᵀ.
    """
    p, s, qh = torch.linalg.svd(x, full_matrices=False)
    r = numerical_rank(s, x.shape)
    if r == s.shape[-1]:
        return p @ qh
    return p[..., :r] @ qh[..., :r, :]


def frobenius_sq(delta: Delta) -> torch.Tensor:
    """‖ΔW‖²_F as a 0-d float32 tensor; for LowRank s²·Σ (BᵀB ⊙ AAᵀ) without forming B·A."""
    if isinstance(delta, LowRank):
        B = delta.B.float()
        A = delta.A.float()
        return (B.transpose(-1, -2) @ B * (A @ A.transpose(-1, -2))).sum() * float(delta.scale) ** 2
    return (delta.float() * delta.float()).sum()


def combine(deltas: Sequence[Delta], coeffs: Sequence[float]) -> Delta:
    """Σ cᵢ·Δᵢ, kept factored when every input is a LowRank (factors concatenated: rank Σ rᵢ)."""
    if deltas and all(isinstance(d, LowRank) for d in deltas):
        Bs = [d.B.float() * (float(c) * float(d.scale)) for d, c in zip(deltas, coeffs)]  # type: ignore[union-attr]
        As = [d.A.float() for d in deltas]  # type: ignore[union-attr]
        return LowRank(torch.cat(Bs, dim=1), torch.cat(As, dim=0), 1.0)
    acc: torch.Tensor | None = None
    for d, c in zip(deltas, coeffs):
        x = d.dense() if isinstance(d, LowRank) else d
        acc = x * float(c) if acc is None else acc.add(x, alpha=float(c))
    if acc is None:
        raise ValueError("combine() needs at least one task vector")
    return acc


def expert_svd(ctx: MergeContext, i: int, delta: Delta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of expert ``i``'s task vector for this tensor, memoised in ``ctx`` under
    ``("svd", expert_id)`` so every run of a sweep (tsv, optmerge, iso_cts, …) decomposes it once.
    Callers must not modify the returned tensors in place."""
    return ctx.remember(("svd", ctx.expert_id(i)), lambda: svd(delta))
