"""Exact k-th largest magnitude over a stream of tensors, in bounded memory (TIES ``scope: model``).

For finite float32 values, |x| ≥ 0 and the ordering of non-negative floats equals the ordering of their
32-bit patterns read as integers. So the k-th largest |x| over a whole model is found by a two-pass radix
select over the bit patterns, holding only two 65,536-bin histograms:

1. pass 0: histogram of the top 16 bits of every |x|; walking the bins from the top, find the bin b where
   the running count first reaches k (k' = k − count in bins above b);
2. pass 1: histogram of the low 16 bits of the entries whose top bits equal b; the bin where the running
   count from the top reaches k' gives the low 16 bits.

The result is exactly ``torch.kthvalue(cat(|x|), total − k + 1)``, whatever the chunking or order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from .base import LowRank
from .chunks import in_parts, run_parts

__all__ = ["RadixSelect", "keep_count", "kth_largest_abs", "abs_bits", "top_histogram", "magnitude_histogram",
           "kth_largest_magnitude", "TiesThresholdPrepass"]

logger = logging.getLogger(__name__)

_BINS = 1 << 16
_CHUNK = 1 << 20  # values per chunk of the passes over one tensor's own values (int32 scratch: 4 MiB)


def keep_count(density: float, numel: int) -> int:
    """k = ⌊density·numel⌋, at least 1 and at most numel (TIES/mergekit: ``int(density * numel)``)."""
    return max(1, min(numel, int(density * numel)))


def _bits(x: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |x| as float32 (non-negative, so they order like the values)."""
    return abs_bits(x.detach().to(torch.float32).abs())


def abs_bits(magnitude: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of an already non-negative float32 tensor (a view when contiguous)."""
    return magnitude.reshape(-1).contiguous().view(torch.int32)


def top_histogram(bits: torch.Tensor) -> torch.Tensor:
    """Pass 0 of the radix select: counts of the top 16 bits (``bincount`` straight on int32)."""
    return torch.bincount(bits >> 16, minlength=_BINS).cpu()


def _top_bits(bits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Top 16 bits of |x| (without the sign) from the int32 patterns ``bits`` of x, into ``out``."""
    torch.bitwise_and(bits, 0x7FFFFFFF, out=out)
    return out.bitwise_right_shift_(16)


def _signed_bits(x: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of float32 ``x`` (flattened; a view when contiguous)."""
    if x.dtype != torch.float32:
        raise ValueError(f"expected float32 values, got {x.dtype}")
    return x.reshape(-1).contiguous().view(torch.int32)


def magnitude_histogram(x: torch.Tensor, *, threads: int = 1) -> torch.Tensor:
    """Pass 0 of the radix select of |x| straight from float32 ``x`` (no |x| tensor): counts of the top 16
    bits of each |x|, chunk by chunk (``threads`` parts at once). Does not depend on k: callers needing
    several k compute it once."""
    bits = _signed_bits(x)
    parts = in_parts(bits.numel(), _CHUNK, threads if bits.device.type == "cpu" else 1)

    def count(k: int) -> torch.Tensor:
        scratch = torch.empty(min(bits.numel(), _CHUNK), dtype=torch.int32, device=bits.device)
        hist = torch.zeros(_BINS, dtype=torch.int64, device=bits.device)
        for s, e in parts[k]:
            hist += torch.bincount(_top_bits(bits[s:e], scratch[:e - s]), minlength=_BINS)
        return hist

    return sum(run_parts(count, len(parts)), torch.zeros(_BINS, dtype=torch.int64, device=bits.device)).cpu()


def kth_largest_magnitude(x: torch.Tensor, hist: torch.Tensor, k: int, *, threads: int = 1) -> float:
    """Exact k-th largest |x| of float32 ``x`` given its :func:`magnitude_histogram` ``hist``: pass 1 counts
    the low 16 bits of the entries in the bin where the count from the top reaches k
    (:func:`_low_histogram_in_bin`). Equals ``torch.kthvalue(|x|, numel − k + 1)``."""
    bits = _signed_bits(x)
    if not 1 <= k <= bits.numel():
        raise ValueError(f"k = {k} is outside [1, {bits.numel()}]")
    top_bin, k_rest = _walk_from_top(hist, k)
    parts = in_parts(bits.numel(), _CHUNK, threads if bits.device.type == "cpu" else 1)

    def count(j: int) -> torch.Tensor:
        scratch = torch.empty(min(bits.numel(), _CHUNK), dtype=torch.int32, device=bits.device)
        counts = torch.zeros(_BINS, dtype=torch.int64, device=bits.device)
        for s, e in parts[j]:
            counts += _low_histogram_in_bin(bits[s:e], top_bin, scratch)
        return counts

    counts = sum(run_parts(count, len(parts)))
    bottom, _ = _walk_from_top(counts.cpu(), k_rest)  # type: ignore[union-attr]
    return float(torch.tensor([(top_bin << 16) | bottom], dtype=torch.int32).view(torch.float32).item())


_GROUP = 8  # entries per group of the pass-1 filter (a power of two; 8 measured 15–20 % faster than 16 or 4)


def _low_histogram_in_bin(bits: torch.Tensor, top_bin: int, scratch: torch.Tensor) -> torch.Tensor:
    """Counts of the low 16 bits of the entries of ``bits`` (int32 patterns of x) whose |x| has top bits
    ``top_bin``: a few tenths of a percent of them, found without a mask and compaction of every entry.

    The entries are dealt into groups {j, j + L, …, j + (G−1)·L}; the minimum over each group of
    |(|x| bits) − centre of the bin| (halving the array G's log₂ times) is ≤ 2¹⁵ for every group holding an
    entry of the bin. Only those groups' entries are gathered and tested exactly (a superset: a group may
    hold an entry just past the bin, which the exact test drops)."""
    n = bits.numel()
    groups = n // _GROUP
    main = groups * _GROUP
    picked = [bits[main:]]  # the tail that does not fill a group: tested directly
    if groups:
        d = scratch[:main]
        torch.abs(bits[:main].view(torch.float32), out=d.view(torch.float32))  # the bits of |x|
        d.sub_((top_bin << 16) + (1 << 15)).abs_()  # |a − centre| ≤ 2¹⁵ for every a in the bin
        width = main
        while width > groups:
            width //= 2
            torch.minimum(d[:width], d[width:2 * width], out=d[:width])
        hits = torch.nonzero(d[:groups] <= (1 << 15)).squeeze(1)
        if hits.numel():  # gathered one group member t at a time: G sequential sweeps over the chunk
            offsets = torch.arange(_GROUP, device=bits.device, dtype=hits.dtype) * groups
            picked.append(bits.index_select(0, (offsets.unsqueeze(1) + hits).reshape(-1)))
    cand = torch.cat(picked).bitwise_and_(0x7FFFFFFF)
    sel = cand[(cand >> 16) == top_bin]
    return torch.bincount(sel.bitwise_and_(0xFFFF), minlength=_BINS)


def _walk_from_top(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin where the count from the top first reaches ``k``, and k minus the count above it."""
    counts = hist.flip(0).cumsum(0)  # counts[j] = entries in bins ≥ (BINS-1-j)
    j = int(torch.searchsorted(counts, torch.tensor([k], dtype=counts.dtype)).item())
    above = int(counts[j - 1]) if j > 0 else 0
    return _BINS - 1 - j, k - above


@dataclass
class RadixSelect:
    """Streaming exact k-th largest |x| over many tensors (k from ``density`` and the total count).

    Use: ``update(0, t)`` for every tensor, ``end_pass(0)``, ``update(1, t)`` for every tensor again,
    ``end_pass(1)``, then ``value``. Set ``k`` explicitly, or ``density`` to get k = ⌊density·total⌋ (≥ 1).
    """

    density: float | None = None
    k: int | None = None
    total: int = 0
    _hi: torch.Tensor | None = None
    _lo: torch.Tensor | None = None
    _top_bin: int = -1
    _k_rest: int = 0
    value: float | None = None

    def update(self, pass_index: int, x: torch.Tensor) -> None:
        bits = _bits(x)
        if pass_index == 0:
            self.total += bits.numel()
            h = top_histogram(bits)
            self._hi = h if self._hi is None else self._hi + h
        elif pass_index == 1:
            sel = bits[(bits >> 16) == self._top_bin]
            h = torch.bincount(sel & 0xFFFF, minlength=_BINS).cpu()
            self._lo = h if self._lo is None else self._lo + h
        else:
            raise ValueError(f"RadixSelect has passes 0 and 1, got {pass_index}")

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            if self.total == 0 or self._hi is None:
                raise ValueError("RadixSelect saw no values; nothing to select from")
            if self.k is None:
                if self.density is None:
                    raise ValueError("RadixSelect needs k or density")
                self.k = keep_count(self.density, self.total)
            if not 1 <= self.k <= self.total:
                raise ValueError(f"k = {self.k} is outside [1, {self.total}]")
            self._top_bin, self._k_rest = _walk_from_top(self._hi, self.k)
        elif pass_index == 1:
            if self._lo is None:
                raise ValueError("RadixSelect pass 1 saw no values")
            low, _ = _walk_from_top(self._lo, self._k_rest)
            pattern = torch.tensor([(self._top_bin << 16) | low], dtype=torch.int32)
            self.value = float(pattern.view(torch.float32).item())


def kth_largest_abs(tensors: Iterable[torch.Tensor] | list[torch.Tensor], k: int) -> float:
    """Exact k-th largest |x| over ``tensors`` (iterated twice; pass a list)."""
    tensors = list(tensors)
    if len(tensors) == 1:  # one tensor: both passes straight from its values
        x = tensors[0].detach().to(torch.float32)
        return kth_largest_magnitude(x, magnitude_histogram(x), k)
    sel = RadixSelect(k=k)
    for p in (0, 1):
        for t in tensors:
            sel.update(p, t)
        sel.end_pass(p)
    return float(sel.value)  # type: ignore[arg-type]


class TiesThresholdPrepass:
    """The :class:`~omnimerge.algorithms.registry.Prepass` of ``ties`` with ``scope: model``.

    One state per expert; its result is that expert's model-wide trim threshold (the k-th largest |τᵢ|
    over every tensor the rule merges, k = ⌊density·total numel⌋), read by the method as
    ``ctx.model_stats["ties_threshold"][expert_id]``.
    """

    stat_key = "ties_threshold"
    passes = 2

    def __init__(self, density: float) -> None:
        self.density = float(density)

    def new_state(self, params: Mapping[str, Any]) -> RadixSelect:
        return RadixSelect(density=float(params.get("density", self.density)))

    def update(self, state: RadixSelect, pass_index: int, delta: Any) -> None:
        state.update(pass_index, delta.dense() if isinstance(delta, LowRank) else delta)

    def end_pass(self, state: RadixSelect, pass_index: int) -> None:
        state.end_pass(pass_index)

    def result(self, state: RadixSelect) -> float:
        if state.value is None:
            raise ValueError("ties threshold pre-pass did not finish both passes")
        return state.value
