"""Spherical linear interpolation of two models (Shoemake 1985; mergekit ``slerp``).

With exactly two experts, v₀ = θ₀ + τ₁ and v₁ = θ₀ + τ₂ (full weights, as mergekit interpolates models):
the angle Ω between them comes from the normalised dot product d = ⟨v₀/‖v₀‖, v₁/‖v₁‖⟩ (a vector whose
norm is ≤ 1e-8 is left unnormalised, as in mergekit), and

    θ = sin((1 − t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁,   Ω = arccos d,

falling back to the linear interpolation (1 − t)·v₀ + t·v₁ when |d| > 0.9995 (near-parallel, where
sin Ω → 0; mergekit's DOT_THRESHOLD). t = 0 gives the first expert, t = 1 the second. The dot product
and the angle are computed in float64 (mergekit uses float32 NumPy); the interpolation in float32.
A mergekit recipe (base A, model B, t) is experts [A, B] here. Recipe weights are not used.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..base import Delta, MergeContext, dense
from ..registry import in_range, register

__all__ = ["slerp"]

DOT_THRESHOLD = 0.9995  # mergekit merge_methods/slerp.py
NORM_EPS = 1e-8  # mergekit merge_methods/slerp.py


@register(symmetric=False, min_experts=2, max_experts=2, checks={"t": in_range(0, 1)},
          reference="Shoemake 1985; mergekit 'slerp'")
def slerp(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext, weights: Sequence[float] | None = None,
          t: float = 0.5) -> torch.Tensor:
    """Spherical interpolation from expert 1 (t = 0) to expert 2 (t = 1); lerp when near-parallel.

    Default t = 0.5 (the midpoint; mergekit requires t explicitly).
    """
    if len(deltas) != 2:
        raise ValueError(f"slerp interpolates exactly 2 experts, got {len(deltas)}")
    v0 = base + dense(deltas[0])
    v1 = base + dense(deltas[1])
    n0 = float(torch.linalg.vector_norm(v0.double()))
    n1 = float(torch.linalg.vector_norm(v1.double()))
    d0 = n0 if n0 > NORM_EPS else 1.0
    d1 = n1 if n1 > NORM_EPS else 1.0
    dot = float((v0.double() * v1.double()).sum()) / (d0 * d1)
    if abs(dot) > DOT_THRESHOLD:
        return (1.0 - t) * v0 + t * v1
    omega = math.acos(max(-1.0, min(1.0, dot)))
    sin_omega = math.sin(omega)
    s0 = math.sin((1.0 - t) * omega) / sin_omega
    s1 = math.sin(t * omega) / sin_omega
    return s0 * v0 + s1 * v1
