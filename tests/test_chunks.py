"""Chunked element-wise passes on threads (algorithms/chunks.py) give the bits of the plain whole-tensor ops."""

from __future__ import annotations

import pytest
import torch

from omnimerge.algorithms import chunks
from omnimerge.algorithms.chunks import cast_chunked, in_parts, scaled_add


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_parts_cover_the_range_in_order_with_whole_chunks() -> None:
    assert in_parts(10, 3, 2) == [[(0, 3), (3, 6)], [(6, 9), (9, 10)]]
    assert in_parts(10, 3, 9) == [[(0, 3)], [(3, 6)], [(6, 9)], [(9, 10)]]  # no more parts than chunks
    assert in_parts(10, 100, 4) == [[(0, 10)]]
    assert in_parts(0, 4, 2) == []


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1001,), (37, 29), ()])
def test_scaled_add_and_cast_keep_the_bits_of_whole_tensor_ops(monkeypatch: pytest.MonkeyPatch, threads: int,
                                                               shape) -> None:
    monkeypatch.setattr(chunks, "SCALE_CHUNK", 16)  # many chunks, split over the threads
    g = torch.Generator().manual_seed(threads)
    x = torch.randn(shape, generator=g) * 1e-3
    base = torch.randn(shape, generator=g) * 0.02
    if shape:  # signed zeros and values whose bf16 rounding ties
        x.view(-1)[:4] = -0.0
        base.view(-1)[2:6] = -0.0
        base.view(-1)[6:9] = torch.tensor([1.0 + 2 ** -8, -(1.0 + 3 * 2 ** -8), 3.0e38])
    for scale in (0.5, 1 / 3, -0.7):
        got = scaled_add(x, scale, base, threads=threads)
        assert torch.equal(_bits(got), _bits(base + scale * x))
        assert torch.equal(_bits(cast_chunked(got, torch.bfloat16, threads=threads)), _bits(got.to(torch.bfloat16)))
        for dtype in (torch.bfloat16, torch.float16, torch.float32):  # straight into the storage dtype
            narrow = scaled_add(x, scale, base, threads=threads, out_dtype=dtype)
            assert narrow.dtype == dtype and narrow.shape == x.shape
            assert torch.equal(_bits(narrow), _bits((base + scale * x).to(dtype)))
