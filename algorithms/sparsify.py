"""Sparsifiers: functions that turn one task vector τ into a sparser τ̃ before a host method merges.

A family is a sparsifier plus a host (STYLE.md: parameterised, not subclassed): ``dare_linear`` is
:func:`dare` hosted by task arithmetic, ``dare_ties`` is :func:`dare` hosted by TIES, ``della`` is
:func:`della_magprune` hosted by TIES, ``breadcrumbs`` is :func:`magnitude_outliers` hosted by task
arithmetic. Random sparsifiers draw from a caller-supplied CPU ``torch.Generator`` (``ctx.generator``)
and move the mask to the tensor's device, so bytes never depend on the device, worker or order.
"""

from __future__ import annotations

import torch

from .selection import keep_count, kth_largest_abs

__all__ = ["dare", "keep_count", "magnitude_threshold", "trim", "magnitude_outliers", "della_magprune"]


def dare(delta: torch.Tensor, p: float, generator: torch.Generator, *, rescale: bool = True) -> torch.Tensor:
    """DARE (Yu et al. 2024, arXiv 2311.03099): drop each entry independently with probability ``p``,
    multiply the survivors by 1/(1−p) (``rescale``) so the expectation is τ.

    The uniform draws u ~ U[0,1) come from ``generator`` on the CPU; an entry survives when u ≥ p.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop probability p must lie in [0, 1), got {p}")
    if p == 0.0:
        return delta
    u = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device="cpu").to(delta.device)
    kept = torch.where(u >= p, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    return kept / (1.0 - p) if rescale else kept


def magnitude_threshold(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The k-th largest |τ| (k = ⌊density·numel⌋, ≥ 1) as a 0-d tensor — exact: the radix select of
    :mod:`~omnimerge.algorithms.selection` (equal to ``torch.kthvalue``, about 3× faster on CPU)."""
    k = keep_count(density, delta.numel())
    return torch.tensor(kth_largest_abs([delta], k), dtype=delta.dtype, device=delta.device)


def trim(delta: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """TIES trim: keep entries with |τ| ≥ threshold (ties at the threshold are kept), zero the rest."""
    t = torch.as_tensor(threshold, dtype=delta.dtype, device=delta.device)
    return torch.where(delta.abs() >= t, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


def _ranks(magnitude: torch.Tensor, dim: int) -> torch.Tensor:
    """0-based rank of each entry along ``dim`` by ascending magnitude; equal values are ranked by
    position (stable sort), so the result is deterministic on every device."""
    order = torch.sort(magnitude, dim=dim, stable=True).indices
    ranks = torch.empty_like(order)
    src = torch.arange(magnitude.shape[dim], device=magnitude.device).expand_as(order)
    ranks.scatter_(dim, order, src.contiguous())
    return ranks


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs mask (Davari & Belilovsky 2023, arXiv 2312.06795; mergekit ``magnitude_outliers``).

    With n = numel: drop the ⌊γ·n⌋ largest |τ| and the n − ⌊density·n⌋ − ⌊γ·n⌋ smallest, keeping exactly
    ⌊density·n⌋ entries (if that is negative the top cut shrinks, as in mergekit). Ranks break ties by
    position. Unlike mergekit's ``indices[n_bot:-n_top]`` this keeps the right entries when ⌊γ·n⌋ = 0.
    """
    if density >= 1.0 and gamma <= 0.0:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    ranks = _ranks(delta.reshape(-1).abs(), 0).reshape(delta.shape)
    keep = (ranks >= n_bot) & (ranks < n - n_top)
    return torch.where(keep, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, *,
                   rescale: bool = True) -> torch.Tensor:
    """DELLA MagPrune (Deep et al. 2024, arXiv 2406.11617; mergekit ``della_magprune``).

    Within each row (the last dimension; a 1-D tensor is one row) entries are ranked by |τ|; the keep
    probability rises linearly with rank from density − ε (smallest) to density + ε (largest):
    pᵢ = density − ε + 2ε·rankᵢ/(n_row − 1) (a one-entry row keeps with probability density). Each entry
    survives when u < pᵢ, u ~ U[0,1) from ``generator``; survivors are divided by pᵢ (``rescale``, the
    paper's 1/(1 − drop probability)).
    """
    if density >= 1.0:
        return delta
    if not (0.0 < density - epsilon and density + epsilon <= 1.0):
        raise ValueError(f"DELLA needs 0 < density − epsilon and density + epsilon ≤ 1, got density={density}, "
                         f"epsilon={epsilon}")
    x = delta.unsqueeze(0) if delta.dim() < 2 else delta.reshape(-1, delta.shape[-1])
    n_row = x.shape[-1]
    ranks = _ranks(x.abs(), 1).to(torch.float32)
    norm = ranks / (n_row - 1) if n_row > 1 else torch.full_like(ranks, 0.5)
    probs = (density - epsilon) + norm * (2.0 * epsilon)
    u = torch.rand(x.shape, generator=generator, dtype=torch.float32, device="cpu").to(x.device)
    keep = u < probs
    out = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if rescale:
        out = out / probs
    return out.reshape(delta.shape)

