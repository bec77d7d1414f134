"""WUDI merging (Cheng et al. 2025, "Whoever Started the Interference Should End It", arXiv 2503.08099;
official code ``nathanielyvo/WUDI-Merging``, the paper's ``wudi_merging``).

Per 2-D tensor: minimise L(T) = Σᵢ ‖(T − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F from T₀ = Σ τᵢ (sum, not mean) with
Adam (lr 1e-5, betas (0.9, 0.999), eps 1e-8, no weight decay) for 300 full-batch steps, in float32;
θ = θ₀ + λ·T. The steps use the closed-form gradient 2(T·S − R), S = Σ τᵢᵀτᵢ/‖τᵢ‖², R = Σ τᵢτᵢᵀτᵢ/‖τᵢ‖²
(:mod:`~omnimerge.algorithms.quadratic`), which is the autograd trajectory up to rounding. Non-2-D
tensors use the fallback (``weight_average``: the mean, as the official code); the engine keeps
``lm_head`` out by rule. Recipe weights are not used. ``wudi_batched`` runs a stack ``[B, m, n]`` at once.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..base import Delta, MergeContext
from ..interference import InterferenceSettings, solve_interference
from ..lowrank import require_2d
from ..registry import in_range, register

__all__ = ["wudi", "wudi_batched"]


def _settings(lr: float, steps: int) -> InterferenceSettings:
    return InterferenceSettings(low_rank=False, demean=False, init="sum", optimizer="adam", lr=float(lr),
                                steps=int(steps))


def wudi_batched(bases: torch.Tensor, deltas: Sequence[torch.Tensor], *, ctxs: Sequence[MergeContext],
                 weights: Sequence[float] | None = None, lr: float = 1e-5, steps: int = 300,
                 scale: float = 1.0) -> torch.Tensor:
    """``wudi`` on B same-shape matrices: ``bases`` [B, m, n], N deltas [B, m, n], one ctx per item."""
    if bases.dim() != 3:
        raise ValueError(f"wudi_batched expects bases of shape [B, m, n], got {list(bases.shape)}")
    merged = solve_interference(deltas, ctxs=ctxs, settings=_settings(lr, steps), tag="wudi", batched=True)
    return bases + scale * merged


@register(handles="2d", fallback="weight_average", accepts_lowrank=True, batched=wudi_batched,
          checks={"lr": in_range(0, None, low_open=True), "steps": in_range(0, None)},
          reference="Cheng et al. 2025, arXiv 2503.08099 (WUDI)")
def wudi(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext, weights: Sequence[float] | None = None,
         lr: float = 1e-5, steps: int = 300, scale: float = 1.0) -> torch.Tensor:
    """Minimise the data-free interference loss by Adam from Σ τᵢ: θ₀ + λ·T.

    Defaults: lr 1e-5 and 300 steps (official WUDI code, ALGORITHMS.md); λ = ``scale`` 1.0 (official
    WUDI applies λ = 1).
    """
    require_2d("wudi", base)
    merged = solve_interference(deltas, ctxs=[ctx], settings=_settings(lr, steps), tag="wudi", batched=False)
    return base + scale * merged
