"""The data-free interference objective shared by WUDI and OptMerge, built and solved in closed form.

For one m×n tensor (or a batch ``[B, m, n]`` of same-shape tensors) and N task vectors τᵢ:

    minimise  L(T) = Σᵢ ‖(T − Tᵢ) Pᵢᵀ‖²_F / ‖τᵢ‖²_F

- WUDI (Cheng et al. 2025, arXiv 2503.08099) — ``low_rank=False``: Pᵢ = Tᵢ = τᵢ.
- OptMerge (Wei et al. 2025, arXiv 2505.19892; code ``wudi_merging2``) — ``low_rank=True``:
  k = ⌊min(m, n)/N⌋, Pᵢ = S_k V_kᵀ from the SVD of the raw τᵢ (so PᵢᵀPᵢ = V_k S_k² V_kᵀ), and the target
  Tᵢ = trunc_k(τᵢ) (LoRA variant) or trunc_k(τᵢ − τ̄) + τ̄ with τ̄ = mean τⱼ (full fine-tuning variant,
  ``demean=True``). The normaliser always uses the raw, untruncated τᵢ.

An expert with τᵢ = 0 contributes nothing (the papers' code would divide 0 by 0). T starts at Σ τᵢ
(``init="sum"``) or τ̄ (``"mean"``) and takes ``steps`` Adam or SGD steps on the closed-form gradient
(:mod:`~omnimerge.algorithms.quadratic`). Per-expert SVDs and the final T are memoised in each
tensor's :class:`MergeContext`, so a sweep over λ (which only scales T) or over other methods that need
the same SVDs (tsv, iso_cts) computes them once.
"""

from __future__ import annotations

import logging
from dataclasses import astuple, dataclass
from typing import Callable, Sequence

import torch

from .base import Delta, LowRank, MergeContext, dense, remember_batched
from .lowrank import combine, expert_svd, frobenius_sq, svd
from .quadratic import build_quadratic, choose_form, minimise

__all__ = ["InterferenceSettings", "solve_interference"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InterferenceSettings:
    """Everything the merged T depends on besides the task vectors (the memo key)."""

    low_rank: bool
    demean: bool
    init: str
    optimizer: str
    lr: float
    steps: int
    momentum: float = 0.0


def _inv_norm(norm_sq: torch.Tensor) -> torch.Tensor:
    """1/‖τᵢ‖ per batch item, 0 where τᵢ = 0."""
    safe = torch.where(norm_sq > 0, norm_sq, torch.ones_like(norm_sq))
    return torch.where(norm_sq > 0, safe.rsqrt(), torch.zeros_like(norm_sq))


def _reconstruct(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, k: int) -> torch.Tensor:
    return torch.matmul(u[..., :k] * s[..., None, :k], v[..., :k].transpose(-1, -2))


def solve_interference(deltas: Sequence[Delta], *, ctxs: Sequence[MergeContext], settings: InterferenceSettings,
                       tag: str, batched: bool) -> torch.Tensor:
    """The minimiser T after ``settings.steps`` optimiser steps, shaped like one delta.

    Args:
        deltas: N task vectors — each 2-D (Tensor or LowRank) when ``batched`` is false, each a
            ``[B, m, n]`` Tensor when it is true.
        ctxs: one context when not batched, else one per batch item (memo, expert ids).
        settings: the loss and optimiser settings.
        tag: the method name, part of the memo keys.
        batched: whether the deltas carry a leading batch dimension.
    """
    n_exp = len(deltas)
    eids = [tuple(c.expert_id(i) for i in range(n_exp)) for c in ctxs]

    def compute() -> torch.Tensor:
        return _solve(deltas, ctxs=ctxs, settings=settings, batched=batched, eids=eids)

    key_t = lambda c: (f"{tag}.T", tuple(c.expert_id(i) for i in range(n_exp)), astuple(settings))  # noqa: E731
    if batched:
        return remember_batched(ctxs, key_t, compute)
    return ctxs[0].remember(key_t(ctxs[0]), lambda: compute()[0])


def _solve(deltas: Sequence[Delta], *, ctxs: Sequence[MergeContext], settings: InterferenceSettings, batched: bool,
           eids: list[tuple[str, ...]]) -> torch.Tensor:
    n_exp = len(deltas)
    if batched:
        taus = [d for d in deltas]  # [B, m, n] each
        norm_sq = [(t * t).sum(dim=(-2, -1)) for t in taus]

        def svd_of(i: int) -> tuple[torch.Tensor, ...]:
            return remember_batched(ctxs, lambda c: ("svd", c.expert_id(i)), lambda: svd(taus[i]))
    else:
        taus = [dense(d).unsqueeze(0) for d in deltas]
        norm_sq = [frobenius_sq(d).reshape(1) for d in deltas]

        def svd_of(i: int) -> tuple[torch.Tensor, ...]:
            return tuple(x.unsqueeze(0) for x in expert_svd(ctxs[0], i, deltas[i]))

    m, n = taus[0].shape[-2], taus[0].shape[-1]
    inv = [_inv_norm(ns) for ns in norm_sq]
    targets: list[torch.Tensor] = []
    factors: list[torch.Tensor] = []
    if not settings.low_rank:
        for i in range(n_exp):
            targets.append(taus[i])
            if not batched and isinstance(deltas[i], LowRank):
                u, s, v = svd_of(i)
                factors.append(v * (s * inv[i][:, None])[..., None, :])
            else:
                factors.append(taus[i].transpose(-1, -2) * inv[i][:, None, None])
    else:
        k = min(m, n) // n_exp
        mean = torch.stack(taus).mean(dim=0) if settings.demean else None
        for i in range(n_exp):
            u, s, v = svd_of(i)
            factors.append(v[..., :k] * (s[..., :k] * inv[i][:, None])[..., None, :])
            if mean is None:
                targets.append(_reconstruct(u, s, v, k))
                continue
            ud, sd, vd = _demeaned_svd(deltas, i, ctxs=ctxs, taus=taus, mean=mean, batched=batched)
            targets.append(_reconstruct(ud, sd, vd, k) + mean)
    init = torch.stack(taus).sum(dim=0)
    if settings.init == "mean":
        init = init / n_exp
    elif settings.init != "sum":
        raise ValueError(f"init must be 'sum' or 'mean', got {settings.init!r}")
    r = sum(int(f.shape[-1]) for f in factors)
    form = choose_form(m, n, r, settings.steps)
    logger.debug("interference solve: %d×%d, N=%d, r=%d, %s form, %s×%d", m, n, n_exp, r, form,
                 settings.optimizer, settings.steps)
    problem = build_quadratic(targets, factors, steps=settings.steps, form=form)
    return minimise(init, problem, optimizer=settings.optimizer, steps=settings.steps, lr=settings.lr,
                    momentum=settings.momentum)


def _demeaned_svd(deltas: Sequence[Delta], i: int, *, ctxs: Sequence[MergeContext], taus: list[torch.Tensor],
                  mean: torch.Tensor, batched: bool) -> tuple[torch.Tensor, ...]:
    """SVD of τᵢ − τ̄ (memoised per expert set); LowRank inputs stay factored (rank Σ rⱼ)."""
    n_exp = len(deltas)
    key: Callable[[MergeContext], tuple] = lambda c: (  # noqa: E731
        "svd.demeaned", tuple(c.expert_id(j) for j in range(n_exp)), i)
    if batched:
        return remember_batched(ctxs, key, lambda: svd(taus[i] - mean))
    if all(isinstance(d, LowRank) for d in deltas):
        coeffs = [(1.0 if j == i else 0.0) - 1.0 / n_exp for j in range(n_exp)]
        target: Delta = combine(deltas, coeffs)
    else:
        target = taus[i][0] - mean[0]
    return tuple(x.unsqueeze(0) for x in ctxs[0].remember(key(ctxs[0]), lambda: svd(target)))
