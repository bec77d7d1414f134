"""OptMerge / WUDI v2 (Wei et al. 2025, arXiv 2505.19892; the paper's ``wudi_merging2``).

Per 2-D m×n tensor with N experts, k = ⌊min(m, n)/N⌋: minimise
L(T) = Σᵢ ‖(T − Tᵢ) Pᵢᵀ‖²_F / ‖τᵢ‖²_F with the projector Pᵢ = S_k V_kᵀ of the raw τᵢ's SVD and the
low-rank target Tᵢ; θ = θ₀ + λ·T (:mod:`~omnimerge.algorithms.interference`). Two variants
(ALGORITHMS.md; the code is authoritative where the paper text differs):

======================  ================================  ====================================
setting                 ``variant: full`` (InternVL)      ``variant: lora`` (Qwen2-VL LoRA)
======================  ================================  ====================================
target Tᵢ               trunc_k(τᵢ − τ̄) + τ̄               trunc_k(τᵢ)
init                    sum  (Σ τᵢ)                        mean (τ̄)
optimizer               adam, lr 1e-5                      sgd, lr 1e-4, momentum 0.9
steps                   300                                300
λ (scale)               0.1                                1.0
======================  ================================  ====================================

Ablation switches (PAPER.md Table 5) override the variant's defaults; a parameter left unset keeps it:
``optimizer: adam|sgd`` (lr unset → 1e-5 for adam, 1e-4 for sgd; momentum unset → 0.9 for sgd),
``init: sum|mean``, ``low_rank: false`` (Pᵢ = Tᵢ = τᵢ, i.e. WUDI's loss), ``lr``, ``steps``, ``momentum``.
Table 5's Qwen2-VL rows are then single recipes:

- WUDI:             ``{variant: lora, optimizer: adam, init: sum, low_rank: false}`` (= ``wudi``)
- + SGD:            ``{variant: lora, init: sum, low_rank: false}``
- + mean init:      ``{variant: lora, low_rank: false}``
- + low-rank (= OptMerge): ``{variant: lora}``

All math in float32 (the paper's LoRA script optimises in fp16). Non-2-D tensors use the fallback
(``weight_average``: the mean, the paper's code). LowRank task vectors are decomposed in factored form.
Recipe weights are not used. ``optmerge_batched`` runs a stack ``[B, m, n]`` at once.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..base import Delta, MergeContext
from ..interference import InterferenceSettings, solve_interference
from ..lowrank import require_2d
from ..registry import in_range, one_of, register

__all__ = ["optmerge", "optmerge_batched", "resolve_settings", "VARIANT_DEFAULTS"]

# ALGORITHMS.md "OptMerge variants" (from the paper's InternVL and LLaMA-Factory scripts).
VARIANT_DEFAULTS: dict[str, dict[str, object]] = {
    "full": {"optimizer": "adam", "init": "sum", "low_rank": True, "steps": 300, "scale": 0.1, "demean": True},
    "lora": {"optimizer": "sgd", "init": "mean", "low_rank": True, "steps": 300, "scale": 1.0, "demean": False},
}
DEFAULT_LR = {"adam": 1e-5, "sgd": 1e-4}  # full variant's Adam lr; LoRA variant's SGD lr
DEFAULT_MOMENTUM = {"adam": 0.0, "sgd": 0.9}  # LoRA variant's SGD momentum


def resolve_settings(variant: str, optimizer: str | None, init: str | None, low_rank: bool | None, lr: float | None,
                     steps: int | None, momentum: float | None, scale: float | None) -> tuple[InterferenceSettings, float]:
    """The variant's defaults overlaid with every parameter that was set; returns (settings, λ)."""
    if variant not in VARIANT_DEFAULTS:
        raise ValueError(f"optmerge variant must be 'full' or 'lora', got {variant!r}")
    d = VARIANT_DEFAULTS[variant]
    opt = str(d["optimizer"]) if optimizer is None else optimizer
    if opt not in DEFAULT_LR:
        raise ValueError(f"optmerge optimizer must be 'adam' or 'sgd', got {opt!r}")
    if opt == "adam" and momentum not in (None, 0, 0.0):
        raise ValueError(f"optmerge: momentum={momentum} applies to optimizer 'sgd' only; Adam takes no momentum.")
    settings = InterferenceSettings(
        low_rank=bool(d["low_rank"]) if low_rank is None else bool(low_rank),
        demean=bool(d["demean"]),
        init=str(d["init"]) if init is None else init,
        optimizer=opt,
        lr=float(DEFAULT_LR[opt] if lr is None else lr),
        steps=int(d["steps"] if steps is None else steps),  # type: ignore[call-overload]
        momentum=float(DEFAULT_MOMENTUM[opt] if momentum is None else momentum),
    )
    return settings, float(d["scale"] if scale is None else scale)  # type: ignore[arg-type]


def optmerge_batched(bases: torch.Tensor, deltas: Sequence[torch.Tensor], *, ctxs: Sequence[MergeContext],
                     weights: Sequence[float] | None = None, variant: str = "full", optimizer: str | None = None,
                     init: str | None = None, low_rank: bool | None = None, lr: float | None = None,
                     steps: int | None = None, momentum: float | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """``optmerge`` on B same-shape matrices: ``bases`` [B, m, n], N deltas [B, m, n], one ctx per item."""
    if bases.dim() != 3:
        raise ValueError(f"optmerge_batched expects bases of shape [B, m, n], got {list(bases.shape)}")
    settings, lam = resolve_settings(variant, optimizer, init, low_rank, lr, steps, momentum, scale)
    merged = solve_interference(deltas, ctxs=ctxs, settings=settings, tag="optmerge", batched=True)
    return bases + lam * merged


@register(handles="2d", fallback="weight_average", accepts_lowrank=True, batched=optmerge_batched,
          checks={"variant": one_of("full", "lora"), "optimizer": one_of("adam", "sgd"), "init": one_of("sum", "mean"),
                  "lr": in_range(0, None, low_open=True), "steps": in_range(0, None),
                  "momentum": in_range(0, 1, high_open=True)},
          reference="Wei et al. 2025, arXiv 2505.19892 (OptMerge)")
def optmerge(base: torch.Tensor, deltas: Sequence[Delta], *, ctx: MergeContext, weights: Sequence[float] | None = None,
             variant: str = "full", optimizer: str | None = None, init: str | None = None, low_rank: bool | None = None,
             lr: float | None = None, steps: int | None = None, momentum: float | None = None,
             scale: float | None = None) -> torch.Tensor:
    """OptMerge: optimise T against rank-k-denoised task vectors; θ₀ + λ·T.

    Defaults: ``variant`` full (the InternVL full fine-tuning script); every other parameter unset takes
    the variant's value from the table in the module docstring (ALGORITHMS.md, from the paper's scripts).
    """
    require_2d("optmerge", base)
    settings, lam = resolve_settings(variant, optimizer, init, low_rank, lr, steps, momentum, scale)
    merged = solve_interference(deltas, ctxs=[ctx], settings=settings, tag="optmerge", batched=False)
    return base + lam * merged
