"""TIES sign election and disjoint merge, shared by every TIES host (ties, dare_ties, della).

Given task vectors τᵢ, optionally trimmed here to |τᵢ| ≥ tᵢ (τ̂ᵢ), and recipe weights wᵢ (mergekit multiplies
each τ̂ᵢ by wᵢ before electing, ``generalized_task_arithmetic.py``), with xᵢ = wᵢτ̂ᵢ:

- elect  γ = sign(Σᵢ xᵢ) per entry — the sign of the mass, not a vote (Yadav et al. 2023, §3);
  where that sum is exactly 0, γ = g = sign(Σ γ) over the whole tensor (the TIES paper code's
  ``majority_sign``; mergekit uses +1 instead), Σγ counted exactly (an integer: #positive − #negative).
  If g is 0 too, the entry elects nothing (output +0).
- merge  τ_m = Σ_{i: sign(xᵢ)=γ} xᵢ / Σ_{i: sign(xᵢ)=γ} wᵢ (sums in expert order, from +0), the divisor
  replaced by 1 where it is 0 (no expert agrees), or not divided at all when ``normalize`` is false
  (mergekit's ``normalize: false``).

With unit weights the divisor is the count of non-zero agreeing entries, clamped to ≥ 1: exactly the
paper's disjoint mean.

How it runs (the bits are those of the formulas above, element by element; tests/test_ties_bits.py writes them
out plainly): the tensor is walked in chunks of :data:`CHUNK_ELEMENTS` values that stay in the CPU caches, each
pass one short torch kernel on the chunk, and no kernel that is slow on the CPU (``where``, ``masked_fill``,
comparisons to bool). Two sweeps over the chunks: the first forms Σxᵢ and counts Σγ (g is needed before any
entry whose sum is 0 can be merged); the second re-forms the xᵢ (cheaper than storing them) and merges:

- trim: ``xᵢ = τᵢ·sign(threshold(|τᵢ|, t⁻, 0))`` — 1 where |τᵢ| > t⁻ (t⁻ the float just below tᵢ, so
  |τᵢ| ≥ tᵢ), else 0: the kept values exactly, the others ±0;
- agreement ``aᵢ = max(sign(xᵢ·γ), 0)`` ∈ {0, 1} (1 ⟺ xᵢ·γ > 0 ⟺ sign(xᵢ) = γ ≠ 0);
- ``num += xᵢ·aᵢ`` and ``den += wᵢ·aᵢ``: the products are exact (aᵢ is 0 or 1), so each sum adds the same
  values in the same order as the formula; a zero term only ever meets a zero sum started at +0.

The sign of a zero differs from the formula's only in entries nothing is added to (a trimmed xᵢ is −0
where its τᵢ was negative), and such zeros never reach the output: sign(±0) = 0, ±0·γ is not > 0.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F

from .chunks import in_parts, run_parts

__all__ = ["CHUNK_ELEMENTS", "ties_merge", "ties_consensus", "trim_cut"]

#: Values per chunk of the element-wise passes (float32: 1 MiB per buffer). ``OMNIMERGE_TIES_CHUNK`` overrides
#: it (tests use tiny chunks to cut tensors in odd places).
CHUNK_ELEMENTS = int(os.environ.get("OMNIMERGE_TIES_CHUNK", 1 << 18))


def trim_cut(threshold: float) -> float:
    """The largest float32 below ``threshold`` (≥ 0), so that ``|x| > cut`` ⟺ ``|x| ≥ threshold``
    (``F.threshold`` keeps values strictly above its threshold). A threshold of 0 keeps everything."""
    t = torch.tensor([threshold], dtype=torch.float32)
    bits = int(t.view(torch.int32).item())
    if bits <= 0:  # +0 (or −0): every |x| ≥ 0
        return -1.0
    return float(torch.tensor([bits - 1], dtype=torch.int32).view(torch.float32).item())


class _Chunks:
    """Reused chunk-sized buffers of one call."""

    def __init__(self, size: int, like: torch.Tensor) -> None:
        self._size = size
        self._like = like
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, key: str, n: int) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None:
            buf = torch.empty(self._size, dtype=self._like.dtype, device=self._like.device)
            self._bufs[key] = buf
        return buf[:n]


def _trimmed(d: torch.Tensor, cut: float | None, w: float, out: torch.Tensor) -> torch.Tensor:
    """xᵢ = wᵢ·τ̂ᵢ on one chunk (``out`` unless it is ``d`` itself: untrimmed with unit weight)."""
    if cut is None:
        if w == 1.0:
            return d
        return torch.mul(d, w, out=out)
    torch.abs(d, out=out)
    F.threshold_(out, cut, 0.0)  # |τ| where |τ| ≥ t, else 0
    out.sign_().mul_(d)  # τ·1 or τ·0
    if w != 1.0:
        out.mul_(w)
    return out


def ties_consensus(deltas: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True,
                   thresholds: Sequence[float] | None = None, chunk_elements: int | None = None,
                   threads: int = 1) -> torch.Tensor:
    """τ_m (see module docstring) of task vectors ``deltas``, each trimmed to |τᵢ| ≥ ``thresholds[i]`` first
    when thresholds are given. Returns a new float tensor of the deltas' shape; the inputs are not changed.
    ``threads`` > 1 splits the chunks into that many contiguous parts worked on at once (same bits)."""
    if not deltas:
        raise ValueError("ties_consensus needs at least one task vector")
    shape, device, dtype = deltas[0].shape, deltas[0].device, deltas[0].dtype
    flats = [d.reshape(-1) if d.is_contiguous() else d.contiguous().reshape(-1) for d in deltas]
    w = [float(x) for x in weights]
    if len(w) != len(flats):
        raise ValueError(f"ties_consensus got {len(flats)} task vectors but {len(w)} weights")
    cuts = [None] * len(flats) if thresholds is None else [trim_cut(float(t)) for t in thresholds]
    n = flats[0].numel()
    total = torch.empty(n, dtype=dtype, device=device)  # Σxᵢ, then τ_m in place
    if n == 0:
        return total.reshape(shape)
    step = max(1, chunk_elements or (CHUNK_ELEMENTS if device.type == "cpu" else n))
    parts = in_parts(n, step, threads if device.type == "cpu" else 1)
    buffers = [_Chunks(min(step, n), flats[0]) for _ in parts]

    def sweep_sum(k: int) -> int:
        """Σxᵢ over part k's chunks; returns its Σγ = #(Σ > 0) − #(Σ < 0) (a chunk's float sum of ±1 is
        exact: < 2²⁴ terms)."""
        bufs, balance = buffers[k], 0
        for s, e in parts[k]:
            m, acc = e - s, total[s:e]
            x0 = _trimmed(flats[0][s:e], cuts[0], w[0], bufs.get("x0", m))
            if len(flats) == 1:
                acc.copy_(x0)
            else:
                torch.add(x0, _trimmed(flats[1][s:e], cuts[1], w[1], bufs.get("x", m)), out=acc)
                for d, cut, wi in zip(flats[2:], cuts[2:], w[2:]):
                    acc.add_(_trimmed(d[s:e], cut, wi, bufs.get("x", m)))
            balance += int(torch.sign(acc, out=bufs.get("g", m)).sum().item())
        return balance

    balance = sum(run_parts(sweep_sum, len(parts)))
    fallback = (balance > 0) - (balance < 0)
    unit_den = all(x >= 1.0 for x in w)  # then Σ of agreeing weights is 0 or ≥ 1

    def sweep_merge(k: int) -> None:
        """γ, then the agreeing sums over part k's chunks; τ_m overwrites Σ chunk by chunk."""
        bufs = buffers[k]
        for s, e in parts[k]:
            m = e - s
            gamma = torch.sign(total[s:e], out=bufs.get("g", m))
            if fallback:
                gamma.add_(0.5 * fallback).sign_()  # 0 → g; ±1 stay (|±1 ± 0.5| ≥ 0.5)
            num = total[s:e].zero_()
            den = bufs.get("den", m).zero_()
            agree = bufs.get("a", m)
            for d, cut, wi in zip(flats, cuts, w):
                x = _trimmed(d[s:e], cut, wi, bufs.get("x", m))
                torch.mul(x, gamma, out=agree).sign_().clamp_min_(0.0)  # 1 where x·γ > 0, else ±0
                num.addcmul_(x, agree)  # exact product: + x or + ±0
                if wi == 1.0:
                    den.add_(agree)
                else:
                    den.add_(agree, alpha=wi)
            if normalize:
                if unit_den:
                    den.clamp_min_(1.0)
                else:  # den + 1 where den == 0: 1 − sign(|den|) is 1 there and 0 elsewhere
                    den.sub_(torch.abs(den, out=bufs.get("z", m)).sign_().sub_(1.0))
                num.div_(den)

    run_parts(sweep_merge, len(parts))
    return total.reshape(shape)


def ties_merge(sparse: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True,
               threads: int = 1) -> torch.Tensor:
    """Elect and disjoint-merge already sparsified task vectors τ̂ᵢ with weights wᵢ → τ_m."""
    return ties_consensus(sparse, weights, normalize=normalize, threads=threads)
