"""DELLA-Merging (Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", arXiv 2406.11617; mergekit ``della`` / ``della_linear``).

Per tensor and expert: MagPrune (:func:`~omnimerge.algorithms.sparsify.della_magprune`) — within each
row, entries ranked by |τᵢ| keep with probability rising linearly from density − ε (smallest) to
density + ε (largest), survivors divided by their keep probability — giving τ̃ᵢ; the mask is drawn on the
CPU from ``ctx.generator("della", expert_id)``. Then, with ``consensus`` (mergekit ``della``), TIES
election and disjoint weighted mean of the τ̃ᵢ (γ = sign Σwᵢτ̃ᵢ, 0 → sign of Σγ over the tensor);
without (mergekit ``della_linear``), Σ wᵢτ̃ᵢ (divided by Σ wᵢ when ``normalize``). θ = θ₀ + λ·τ_m.
Recent mergekit rescales to the L1 norm instead of by 1/p: not done here.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..base import Delta, MergeContext, as_sequence, dense
from ..consensus import ties_merge
from ..registry import in_range, register
from ..sparsify import della_magprune

__all__ = ["della"]


def _streaming(params: Mapping[str, Any]) -> str | None:
    """Without consensus each row is pruned and summed on its own (row-wise ranks): rows stream."""
    return None if params.get("consensus", True) else "rows"


@register(uses_weights=True, random=True, streaming=_streaming, one_thread=True,
          checks={"density": in_range(0, 1, low_open=True), "epsilon": in_range(0, 0.5)},
          reference="Deep et al. 2024, arXiv 2406.11617; mergekit 'della'")
def della(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext, weights: Sequence[float] | None = None,
          density: float = 0.5, epsilon: float = 0.15, consensus: bool = True, normalize: bool = True,
          scale: float = 1.0) -> torch.Tensor:
    """Magnitude-ranked random pruning with rescaling, then TIES consensus (or a plain sum).

    Defaults: epsilon 0.15 (mergekit's default); density 0.5 (chosen here, the middle of the DELLA
    paper's searched keep rates; mergekit's default 1.0 disables pruning); consensus and normalize true
    (mergekit ``della``); λ = ``scale`` 1.0 (mergekit's lambda).
    """
    w = as_sequence(weights, len(deltas))
    sparse = [della_magprune(dense(d), density, epsilon, ctx.generator("della", ctx.expert_id(i)))
              for i, d in enumerate(deltas)]
    if consensus:
        merged = ties_merge(sparse, w, normalize=normalize, threads=ctx.threads)
    else:
        merged = torch.zeros_like(base)
        for wi, x in zip(w, sparse):
            merged.add_(x, alpha=wi)
        if normalize:
            total = sum(w)
            if abs(total) < 1e-8:
                raise ValueError("della: weights sum to zero; set normalize: false or give non-zero weights")
            merged.div_(total)
    return base + scale * merged
