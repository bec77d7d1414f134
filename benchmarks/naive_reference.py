"""Naive autograd implementations of the WUDI and OptMerge losses, written the way the papers' code is.

These are the references the closed-form fast path (``omnimerge.algorithms.quadratic``) must match:
the loss is built per step from the stacked task vectors with batched matmuls, differentiated by
autograd and stepped by ``torch.optim``. They follow ``wudi_merging`` / ``wudi_merging2`` of
``WalkerWorldPeace/MLLMerging`` (projector as the m×n matrix S_matrix @ V with zero rows past k, from a
``full_matrices=True`` SVD), in float32 throughout and without the chunking, printing and device moves.
Used by ``tests/test_optimizing_methods.py`` and ``benchmarks/bench_optimizers.py``.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["naive_wudi", "naive_optmerge"]


def _optimizer(param: torch.nn.Parameter, optimizer: str, lr: float, momentum: float) -> torch.optim.Optimizer:
    if optimizer == "adam":
        return torch.optim.Adam([param], lr=lr)
    if optimizer == "sgd":
        return torch.optim.SGD([param], lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {optimizer!r}")


def _run(init: torch.Tensor, targets: torch.Tensor, projectors: torch.Tensor, norms_sq: torch.Tensor, *,
         optimizer: str, lr: float, steps: int, momentum: float) -> torch.Tensor:
    merging_vector = torch.nn.Parameter(init.clone())
    opt = _optimizer(merging_vector, optimizer, lr, momentum)
    for _ in range(steps):
        disturbing = merging_vector.unsqueeze(0) - targets
        inner = torch.matmul(disturbing, projectors.transpose(1, 2))
        loss = torch.sum(torch.square(inner) / norms_sq[:, None, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return merging_vector.detach()


def naive_wudi(deltas: Sequence[torch.Tensor], *, lr: float = 1e-5, steps: int = 300) -> torch.Tensor:
    """WUDI: Adam on Σᵢ ‖(T − τᵢ)τᵢᵀ‖² / ‖τᵢ‖² from T₀ = Σ τᵢ; returns T."""
    vectors = torch.stack([d.float() for d in deltas])
    norms_sq = torch.square(torch.norm(vectors.reshape(vectors.shape[0], -1), p=2, dim=-1))
    return _run(vectors.sum(dim=0), vectors, vectors, norms_sq, optimizer="adam", lr=lr, steps=steps, momentum=0.0)


def naive_optmerge(deltas: Sequence[torch.Tensor], *, demean: bool, init: str, optimizer: str, lr: float,
                   steps: int, momentum: float = 0.0, low_rank: bool = True) -> torch.Tensor:
    """OptMerge (``wudi_merging2``): rank-k projector S_k V_kᵀ and target, then ``optimizer``; returns T.

    ``demean`` picks the full fine-tuning target trunc_k(τᵢ − τ̄) + τ̄ (else trunc_k(τᵢ)); ``low_rank``
    false uses the raw τᵢ as projector and target (the WUDI loss, for the ablation).
    """
    vectors = torch.stack([d.float() for d in deltas])
    n_exp, m, n = vectors.shape
    average = vectors.mean(dim=0)
    if low_rank:
        projectors, targets = [], []
        for i in range(n_exp):
            vector = vectors[i]
            u, s, v = torch.linalg.svd(vector, full_matrices=True)
            u2, s2, v2 = torch.linalg.svd(vector - average if demean else vector, full_matrices=False)
            k = int(s.shape[0] / n_exp)
            s_mask = torch.zeros_like(s)
            s_mask[:k] = 1
            v_mask = torch.zeros_like(v)
            v_mask[:k, :] = 1
            s_matrix = torch.zeros(m, n)
            d = min(m, n)
            s_matrix[:d, :d] = torch.diag_embed(s * s_mask)
            projectors.append(s_matrix @ (v * v_mask))
            target = u2[:, :k] @ torch.diag_embed(s2[:k]) @ v2[:k, :]
            targets.append(target + average if demean else target)
        proj_t, target_t = torch.stack(projectors), torch.stack(targets)
    else:
        proj_t, target_t = vectors, vectors
    norms_sq = torch.square(torch.norm(vectors.reshape(n_exp, -1), p=2, dim=-1))
    start = vectors.sum(dim=0) if init == "sum" else average
    return _run(start, target_t, proj_t, norms_sq, optimizer=optimizer, lr=lr, steps=steps, momentum=momentum)
