"""DARE hosted by task arithmetic (Yu et al. 2024, "Language Models are Super Mario", arXiv 2311.03099).

Per tensor: each τᵢ independently keeps an entry with probability 1 − p and the survivors are divided by
1 − p (:func:`~omnimerge.algorithms.sparsify.dare`), giving τ̃ᵢ; then τ_m = Σ wᵢτ̃ᵢ (divided by Σ wᵢ when
``normalize``) and θ = θ₀ + λ·τ_m. This is the paper's "TA + DARE" with unit weights, and mergekit's
``dare_linear`` with ``density = 1 − p`` (mergekit's ``rescale: true`` default; recent mergekit versions
rescale to the L1 norm of τᵢ instead of by 1/(1 − p): not done here).

Reproducible: the mask of expert i on tensor t is drawn on the CPU from
``ctx.generator("dare", expert_id)`` (recipe seed + tensor name + expert id), so it does not depend on
the worker, device or order (the paper's code is unseeded). The engine streams it in row blocks: every block
of a tensor draws the next values of that one generator (``MergeContext.generators``), and ``torch.rand`` on the
CPU draws values in order, so the mask is the whole tensor's whatever the block size (tests/test_row_stream.py).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..base import Delta, MergeContext, as_sequence, dense
from ..registry import in_range, register
from ..sparsify import dare

__all__ = ["dare_linear", "dare_deltas"]


def dare_deltas(deltas: Sequence[Delta], *, ctx: MergeContext, p: float, rescale: bool = True) -> list[torch.Tensor]:
    """DARE-sparsify every task vector with its own seeded generator (salt: 'dare', expert id)."""
    return [dare(dense(d), p, ctx.generator("dare", ctx.expert_id(i)), rescale=rescale) for i, d in enumerate(deltas)]


@register(uses_weights=True, random=True, streaming="elements", checks={"p": in_range(0, 1, high_open=True)},
          reference="Yu et al. 2024, arXiv 2311.03099; mergekit 'dare_linear'")
def dare_linear(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext,
                weights: Sequence[float] | None = None, p: float = 0.2, rescale: bool = True,
                normalize: bool = False, scale: float = 1.0) -> torch.Tensor:
    """DARE (drop p, rescale 1/(1−p)) then task arithmetic: θ₀ + λ·Σwᵢτ̃ᵢ.

    Defaults: p 0.2 (paper code's weight_mask_rate, ALGORITHMS.md); rescale true (DARE paper);
    normalize false (mergekit's dare_linear default); λ = ``scale`` 1.0 (paper searched
    {0.1, 0.3, 0.5, 0.7, 1.0, 1.5}).
    """
    w = as_sequence(weights, len(deltas))
    acc = torch.zeros_like(base)
    for wi, d in zip(w, dare_deltas(deltas, ctx=ctx, p=p, rescale=rescale)):
        acc.add_(d, alpha=wi)
    if normalize:
        total = sum(w)
        if abs(total) < 1e-8:
            raise ValueError("dare_linear: weights sum to zero; set normalize: false or give non-zero weights")
        acc.div_(total)
    return base + scale * acc
