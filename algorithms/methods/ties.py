"""TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models", arXiv 2306.01708).

Per tensor, with task vectors τᵢ and recipe weights wᵢ (1 when not given):

1. trim: τ̂ᵢ = τᵢ where |τᵢ| ≥ tᵢ, else 0; tᵢ is the k-th largest |τᵢ| with k = ⌊density·numel⌋ (≥ 1).
   Entries equal to the threshold are kept, so more than k may survive. ``scope: tensor`` takes numel and
   tᵢ per tensor (the paper's Qwen2-VL script); ``scope: model`` uses one threshold per expert over every
   tensor the rule merges (the InternVL and modality scripts), computed exactly by a streaming pre-pass
   (:class:`~omnimerge.algorithms.selection.TiesThresholdPrepass`) and read from
   ``ctx.model_stats["ties_threshold"][expert_id]``.
2. elect γ = sign(Σ wᵢτ̂ᵢ); where it is 0, the sign of Σγ over the tensor (paper code).
3. disjoint mean τ_m = Σ_{agree} wᵢτ̂ᵢ / Σ_{agree} wᵢ (1 where none agree); with ``normalize: false``
   the plain sum of the agreeing wᵢτ̂ᵢ (mergekit's parameter).

θ = θ₀ + λ·τ_m. With unit weights this is the paper's TIES exactly; with weights it is mergekit's
``ties`` (weights multiply τ̂ᵢ before the election, the divisor sums the agreeing weights), except that
mergekit elects +1 where the sum is 0, keeps exactly k entries at the threshold (argsort order), and
uses ``int(density·numel)`` without the ≥ 1 floor.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..base import Delta, MergeContext, as_sequence, dense
from ..chunks import scaled_add
from ..consensus import ties_consensus
from ..registry import in_range, one_of, register
from ..selection import TiesThresholdPrepass, keep_count, kth_largest_magnitude, magnitude_histogram
from ..sparsify import magnitude_threshold

__all__ = ["ties", "ties_thresholds"]


def _prepass(params: Mapping[str, Any]) -> TiesThresholdPrepass | None:
    if params.get("scope", "tensor") != "model":
        return None
    return TiesThresholdPrepass(float(params.get("density", 0.2)))


def _lookup(stats: Mapping[Any, Any], eid: str, density: float) -> Any:
    """The threshold of expert ``eid`` for ``density``: a ``(eid, density)`` key, a ``(eid, params)`` key
    whose params pairs give this density (the engine's form with several TIES rules), else ``eid``."""
    if (eid, density) in stats:
        return stats[(eid, density)]
    for key, value in stats.items():
        if isinstance(key, tuple) and len(key) == 2 and key[0] == eid and isinstance(key[1], tuple):
            try:
                params = dict(key[1])
            except (TypeError, ValueError):
                continue
            if float(params.get("density", 0.2)) == float(density):
                return value
    return stats.get(eid)


def ties_thresholds(deltas: Sequence[torch.Tensor], *, ctx: MergeContext, density: float, scope: str,
                    first: int = 0) -> list[torch.Tensor]:
    """The trim threshold of each expert for this tensor (per tensor, or the model-wide pre-pass value);
    ``deltas[j]`` is expert ``first + j``."""
    if scope == "tensor":
        return [magnitude_threshold(d, density) for d in deltas]
    if scope != "model":
        raise ValueError(f"ties scope must be 'tensor' or 'model', got {scope!r}")
    stats = ctx.model_stats.get(TiesThresholdPrepass.stat_key)
    out = []
    for i, d in enumerate(deltas, start=first):
        eid = ctx.expert_id(i)
        value = None if stats is None else _lookup(stats, eid, density)
        if value is None:
            raise ValueError(
                f"ties with scope 'model' needs the model-wide threshold of expert '{eid}' for tensor "
                f"'{ctx.tensor_name}' in ctx.model_stats['ties_threshold'], but it is missing. Run the "
                f"method's pre-pass (MethodSpec.prepass) over every tensor of the rule first, or use scope 'tensor'."
            )
        out.append(torch.as_tensor(float(value), dtype=d.dtype, device=d.device))
    return out


@register(uses_weights=True, prepass=_prepass, one_thread=True,
          checks={"density": in_range(0, 1, low_open=True), "scope": one_of("tensor", "model")},
          reference="Yadav et al. 2023, arXiv 2306.01708; mergekit 'ties'")
def ties(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext, weights: Sequence[float] | None = None,
         density: float = 0.2, scope: str = "tensor", normalize: bool = True, scale: float = 1.0) -> torch.Tensor:
    """TIES: trim to the top density·numel magnitudes, elect signs by mass, disjoint mean; θ₀ + λ·τ_m.

    Defaults: density 0.2 (paper code: mask rate 0.8, ALGORITHMS.md); scope 'tensor' (paper's Qwen2-VL
    script); normalize true (paper's disjoint mean, mergekit's default for ties); λ = ``scale`` 1.0
    (paper searched {0.1, 0.3, 0.5, 0.7, 1.0, 1.5}).
    """
    w = as_sequence(weights, len(deltas))

    def threshold(i: int, d: torch.Tensor) -> float:
        if d.numel() == 0:  # nothing to trim
            return 0.0
        if scope != "tensor":
            return float(ties_thresholds([d], ctx=ctx, density=density, scope=scope, first=i)[0])
        # Pass 0 of the radix select does not depend on the density: a sweep over densities counts it once.
        hist = ctx.remember(("ties_top_histogram", ctx.expert_id(i)),
                            lambda: magnitude_histogram(d, threads=ctx.threads))
        return kth_largest_magnitude(d, hist, keep_count(density, d.numel()), threads=ctx.threads)

    def direction() -> torch.Tensor:
        dense_deltas = [dense(delta) for delta in deltas]
        thresholds = [threshold(i, d) for i, d in enumerate(dense_deltas)]
        return ties_consensus(dense_deltas, w, normalize=normalize, thresholds=thresholds, threads=ctx.threads)

    # τ_m does not depend on λ: a sweep over scales computes it once (same operations, same bytes).
    key = ("ties", tuple(ctx.expert_id(i) for i in range(len(deltas))), tuple(w), density, scope, normalize)
    merged = ctx.remember(key, direction)
    return scaled_add(merged, scale, base, threads=ctx.threads, out_dtype=ctx.out_dtype)  # θ₀ + λ·τ_m, one new tensor
