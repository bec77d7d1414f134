"""Methods share λ-independent work through the sweep memo without changing a bit of their output."""

from __future__ import annotations

import torch

from omnimerge.algorithms import MergeContext, get_method


def test_ties_direction_computed_once_across_scales():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    deltas = [torch.randn(6, 5, generator=g) for _ in range(3)]
    ties = get_method("ties").fn
    memo: dict = {}
    shared = [ties(base, deltas, ctx=MergeContext("w", expert_ids=("a", "b", "c"), memo=memo), scale=s)
              for s in (0.5, 1.0)]
    alone = [ties(base, deltas, ctx=MergeContext("w", expert_ids=("a", "b", "c")), scale=s) for s in (0.5, 1.0)]
    assert _count(memo, "ties") == 1  # one direction for both scales
    assert _count(memo, "ties_top_histogram") == 3  # one radix pass-0 histogram per expert
    for x, y in zip(shared, alone):
        assert torch.equal(x, y)  # byte-identical to the unshared computation
    # A different density or expert set is a different direction; the histograms do not depend on either.
    dense = ties(base, deltas, ctx=MergeContext("w", expert_ids=("a", "b", "c"), memo=memo), density=0.5)
    ties(base, deltas[:2], ctx=MergeContext("w", expert_ids=("a", "b"), memo=memo))
    assert _count(memo, "ties") == 3 and _count(memo, "ties_top_histogram") == 3
    assert torch.equal(dense, ties(base, deltas, ctx=MergeContext("w", expert_ids=("a", "b", "c")), density=0.5))


def _count(memo: dict, kind: str) -> int:
    return sum(1 for key in memo if key[1] == kind)


def test_task_arithmetic_and_weight_average_sum_once_across_scales():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(7, 3, generator=g)
    deltas = [torch.randn(7, 3, generator=g) for _ in range(3)]
    for method in ("task_arithmetic", "weight_average"):
        fn = get_method(method).fn
        memo: dict = {}
        for s in (0.3, 0.5, 1.0):
            got = fn(base, deltas, ctx=MergeContext("w", expert_ids=("a", "b", "c"), memo=memo), weights=[1, 2, 3],
                     scale=s)
            assert torch.equal(got, fn(base, deltas, ctx=MergeContext("w"), weights=[1, 2, 3], scale=s))
        assert _count(memo, method) == 1
        fn(base, deltas, ctx=MergeContext("w", expert_ids=("a", "b", "c"), memo=memo), weights=[1, 2, 4])
        assert _count(memo, method) == 2  # other weights, another sum


def test_methods_return_the_storage_dtype_with_the_bits_of_their_float32_result_cast(monkeypatch):
    """``MergeContext.out_dtype``: ties, task arithmetic and weight average hand back θ₀ + λ·τ_m already in
    the storage dtype, bit for bit the float32 result cast (whole-tensor and chunked paths)."""
    from omnimerge.algorithms import chunks

    g = torch.Generator().manual_seed(2)
    base = torch.randn(40, 33, generator=g) * 0.02
    deltas = [torch.randn(40, 33, generator=g) * 1e-3 for _ in range(3)]
    for chunk in (1 << 18, 64):  # one chunk (plain ops) and many chunks
        monkeypatch.setattr(chunks, "SCALE_CHUNK", chunk)
        for method in ("ties", "task_arithmetic", "weight_average"):
            fn = get_method(method).fn
            wide = fn(base, deltas, ctx=MergeContext("w"), scale=0.7)
            for dtype in (torch.bfloat16, torch.float16):
                got = fn(base, deltas, ctx=MergeContext("w", out_dtype=dtype, threads=2), scale=0.7)
                assert got.dtype == dtype
                assert torch.equal(got.view(torch.int16), wide.to(dtype).view(torch.int16)), (method, dtype)
