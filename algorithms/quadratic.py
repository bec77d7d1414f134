"""Closed-form gradient descent on the quadratic interference losses of WUDI and OptMerge.

Both methods minimise (ALGORITHMS.md, "Fast and exact")

    L(T) = Σᵢ ‖(T − Tᵢ) Pᵢᵀ‖²_F / ‖τᵢ‖²_F = Σᵢ tr((T − Tᵢ) Wᵢ Wᵢᵀ (T − Tᵢ)ᵀ),   Wᵢ = Pᵢᵀ / ‖τᵢ‖_F  (n×kᵢ)

whose gradient is ∇L = 2 (T·S − R) with S = Σᵢ Wᵢ Wᵢᵀ (n×n) and R = Σᵢ Tᵢ Wᵢ Wᵢᵀ (m×n). S and R are
computed once; a step then costs one m×n by n×n product ("gram" form, 2mn² FLOPs) or, when the stacked
W = [W₁ … W_N] (n×r, r = Σ kᵢ) is thin, two products (T·W)·Wᵀ ("factored" form, 4mnr FLOPs). The form
is picked per shape by counting FLOPs (:func:`choose_form`).

The optimisers are written out by hand on that gradient with exactly the update rules of
``torch.optim.Adam`` (single-tensor path: ``lerp`` first moment, bias corrections, ``addcdiv``) and
``torch.optim.SGD`` (momentum buffer seeded with the first gradient, no dampening), so the trajectory
equals autograd + torch.optim up to float32 rounding of the gradient. Every tensor may carry leading
batch dimensions ``[B, m, n]`` (all same-shape matrices of a layer group at once) and lives on whatever
device its inputs are on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

__all__ = ["Quadratic", "choose_form", "build_quadratic", "adam", "sgd", "minimise"]

logger = logging.getLogger(__name__)

Form = Literal["gram", "factored"]


@dataclass(frozen=True)
class Quadratic:
    """L(T) = Σᵢ tr((T − Tᵢ) Gᵢ (T − Tᵢ)ᵀ) stored as its gradient's pieces: ∇L(T) = 2(T·S − R).

    Exactly one of ``S`` ([..., n, n], gram form) and ``W`` ([..., n, r], factored form: S = W Wᵀ) is set.
    """

    R: torch.Tensor
    S: torch.Tensor | None = None
    W: torch.Tensor | None = None

    @property
    def form(self) -> Form:
        return "gram" if self.S is not None else "factored"

    def grad(self, T: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """2(T·S − R), written into ``out`` when given (no allocation per step in the gram form)."""
        if self.S is not None:
            out = torch.matmul(T, self.S, out=out)
        else:
            assert self.W is not None
            out = torch.matmul(torch.matmul(T, self.W), self.W.transpose(-1, -2), out=out)
        return out.sub_(self.R).mul_(2.0)


def choose_form(m: int, n: int, r: int, steps: int) -> Form:
    """"factored" when steps·4mnr < 2n²r + steps·2mn² (the cost of building S and then stepping)."""
    gram = 2 * n * n * r + steps * 2 * m * n * n
    factored = steps * 4 * m * n * r
    return "factored" if factored < gram else "gram"


def build_quadratic(targets: Sequence[torch.Tensor], factors: Sequence[torch.Tensor], *, steps: int,
                    form: Form | Literal["auto"] = "auto") -> Quadratic:
    """S and R from targets Tᵢ ([..., m, n]) and factors Wᵢ ([..., n, kᵢ], Gᵢ = Wᵢ Wᵢᵀ).

    Each Tᵢ Gᵢ is formed as (Tᵢ Wᵢ) Wᵢᵀ or Tᵢ (Wᵢ Wᵢᵀ), whichever costs fewer FLOPs.
    """
    if len(targets) != len(factors) or not targets:
        raise ValueError("build_quadratic needs one factor per target, and at least one")
    m, n = targets[0].shape[-2], targets[0].shape[-1]
    r = sum(int(w.shape[-1]) for w in factors)
    if form == "auto":
        form = choose_form(m, n, r, steps)
    R = torch.zeros_like(targets[0])
    S = None
    if form == "gram":
        S = torch.zeros(*targets[0].shape[:-2], n, n, dtype=targets[0].dtype, device=targets[0].device)
    for t, w in zip(targets, factors):
        k = int(w.shape[-1])
        G = None
        if S is not None:
            G = torch.matmul(w, w.transpose(-1, -2))
            S.add_(G)
        via_gram = (0 if G is not None else 2 * n * n * k) + 2 * m * n * n
        via_factors = 4 * m * n * k
        if via_factors <= via_gram:
            R.add_(torch.matmul(torch.matmul(t, w), w.transpose(-1, -2)))
        else:
            if G is None:
                G = torch.matmul(w, w.transpose(-1, -2))
            R.add_(torch.matmul(t, G))
    if S is not None:
        return Quadratic(R=R, S=S)
    return Quadratic(R=R, W=torch.cat(list(factors), dim=-1))


def adam(T: torch.Tensor, problem: Quadratic, *, steps: int, lr: float, betas: tuple[float, float] = (0.9, 0.999),
         eps: float = 1e-8) -> torch.Tensor:
    """``steps`` Adam steps on ``T`` in place (torch.optim.Adam defaults: no weight decay, no amsgrad)."""
    beta1, beta2 = betas
    exp_avg = torch.zeros_like(T)
    exp_avg_sq = torch.zeros_like(T)
    g = torch.empty_like(T)
    for step in range(1, steps + 1):
        problem.grad(T, out=g)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** float(step)
        bias_correction2 = 1 - beta2 ** float(step)
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
        T.addcdiv_(exp_avg, denom, value=-step_size)
    return T


def sgd(T: torch.Tensor, problem: Quadratic, *, steps: int, lr: float, momentum: float = 0.0) -> torch.Tensor:
    """``steps`` SGD steps on ``T`` in place (torch.optim.SGD: buffer = first gradient, then
    buf ← momentum·buf + g; no dampening, no Nesterov, no weight decay)."""
    g = torch.empty_like(T)
    buf: torch.Tensor | None = None
    for _ in range(steps):
        problem.grad(T, out=g)
        if momentum != 0.0:
            if buf is None:
                buf = g.clone()
            else:
                buf.mul_(momentum).add_(g)
            T.add_(buf, alpha=-lr)
        else:
            T.add_(g, alpha=-lr)
    return T


def minimise(T0: torch.Tensor, problem: Quadratic, *, optimizer: str, steps: int, lr: float,
             momentum: float = 0.0) -> torch.Tensor:
    """Run ``optimizer`` ("adam" | "sgd") from a copy of ``T0`` and return the final T."""
    T = T0.clone()
    if optimizer == "adam":
        return adam(T, problem, steps=steps, lr=lr)
    if optimizer == "sgd":
        return sgd(T, problem, steps=steps, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
