"""TIES and its hosts keep their bits: the fast forms (chunked passes on one or several threads, a density-free
radix histogram, the trim as τ·sign(threshold(|τ|)), agreement as max(sign(x·γ), 0), sums as exact products)
against the straightforward formulas written out here, with the threshold from ``torch.kthvalue``, on inputs
full of the awkward cases (±0, equal magnitudes at the threshold, entries whose signed mass is exactly zero,
negative and fractional weights), cut into chunks of a few values.

The fallback sign where the mass is 0 is the sign of Σγ over the tensor as an exact count (#positive −
#negative): the reference counts in int64."""

from __future__ import annotations

import pytest
import torch

from omnimerge.algorithms import consensus, selection
from omnimerge.algorithms.base import MergeContext
from omnimerge.algorithms.consensus import ties_consensus, ties_merge
from omnimerge.algorithms.registry import get_method
from omnimerge.algorithms.selection import keep_count, kth_largest_magnitude, magnitude_histogram


def _reference_threshold(d: torch.Tensor, density: float) -> torch.Tensor:
    a = d.abs().reshape(-1)
    k = max(1, min(a.numel(), int(density * a.numel())))
    return torch.kthvalue(a, a.numel() - k + 1).values


def _reference_ties_merge(sparse, weights, normalize=True):
    weighted = [x if w == 1.0 else x * float(w) for x, w in zip(sparse, weights)]
    total = torch.zeros_like(weighted[0])
    for x in weighted:
        total.add_(x)
    gamma = torch.sign(total)
    zero = gamma == 0
    if bool(zero.any()):
        majority = torch.sign(gamma.to(torch.int64).sum()).to(gamma.dtype)
        gamma = torch.where(zero, majority, gamma)
    num = torch.zeros_like(gamma)
    den = torch.zeros_like(gamma)
    for x, w in zip(weighted, weights):
        agree = (torch.sign(x) == gamma) & (gamma != 0)
        num.add_(torch.where(agree, x, torch.zeros(())))
        den.add_(agree.to(den.dtype), alpha=float(w))
    if not normalize:
        return num
    den = torch.where(den == 0, torch.ones(()), den)
    return num / den


def _reference_ties(base, deltas, weights, density, normalize, scale):
    trimmed = [torch.where(d.abs() >= _reference_threshold(d, density), d, torch.zeros(())) for d in deltas]
    return base + scale * _reference_ties_merge(trimmed, weights, normalize)


def _awkward(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    deltas = []
    for i in range(n):
        d = torch.randint(-4, 5, shape, generator=g).float() * 1e-3  # many equal magnitudes and exact zeros
        d[torch.rand(shape, generator=g) < 0.1] = -0.0
        deltas.append(d)
    deltas[-1][..., :3] = -deltas[0][..., :3]  # signed mass exactly zero in places
    return base, deltas


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.int32)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 1.5, -0.25]])
@pytest.mark.parametrize("density,normalize", [(0.2, True), (0.5, False), (1.0, True), (0.01, True)])
@pytest.mark.parametrize("shape", [(31, 17), (257,)])
def test_ties_keeps_the_bits_of_the_plain_formulas(shape, density, normalize, weights) -> None:
    base, deltas = _awkward(shape, len(weights), seed=len(shape) * 7 + int(density * 100))
    memo: dict = {}
    got = get_method("ties").fn(base, deltas, ctx=MergeContext(tensor_name="t", memo=memo), weights=weights,
                                density=density, normalize=normalize, scale=0.7)
    want = _reference_ties(base, deltas, weights, density, normalize, 0.7)
    assert torch.equal(_bits(got), _bits(want))
    # A second density reuses the memoised pass-0 histograms and still gives the plain formula's bits.
    got = get_method("ties").fn(base, deltas, ctx=MergeContext(tensor_name="t", memo=memo), weights=weights,
                                density=density / 2, normalize=normalize, scale=0.7)
    assert any(k[1] == "ties_top_histogram" for k in memo)
    assert torch.equal(_bits(got), _bits(_reference_ties(base, deltas, weights, density / 2, normalize, 0.7)))


def test_ties_merge_when_no_entry_has_mass() -> None:
    """Every signed sum zero: γ falls back to the sign of Σγ = 0, nothing agrees, the output is +0."""
    x = torch.tensor([1.0, -2.0, 0.0, -0.0])
    got = ties_merge([x, -x], [1.0, 1.0])
    assert torch.equal(_bits(got), _bits(_reference_ties_merge([x, -x], [1.0, 1.0])))
    assert torch.equal(_bits(got), _bits(torch.zeros(4)))


@pytest.mark.parametrize("method,params", [("dare_ties", {"p": 0.3, "density": 0.4}),
                                           ("della", {"density": 0.5, "epsilon": 0.1})])
def test_ties_hosts_keep_the_bits_of_the_plain_consensus(method: str, params: dict) -> None:
    base, deltas = _awkward((23, 19), 3, seed=5)
    weights = [1.0, 0.5, 2.0]
    ctx = MergeContext(tensor_name="w", seed=3, expert_ids=("a", "b", "c"))
    got = get_method(method).fn(base, deltas, ctx=ctx, weights=weights, scale=0.9, **params)
    # The same sparsified vectors (same seeded draws), then the plain consensus.
    if method == "dare_ties":
        from omnimerge.algorithms.methods.dare_linear import dare_deltas

        sparse = dare_deltas(deltas, ctx=ctx, p=params["p"])
        sparse = [torch.where(d.abs() >= _reference_threshold(d, params["density"]), d, torch.zeros(()))
                  for d in sparse]
    else:
        from omnimerge.algorithms.sparsify import della_magprune

        sparse = [della_magprune(d, params["density"], params["epsilon"], ctx.generator("della", e))
                  for d, e in zip(deltas, ("a", "b", "c"))]
    want = base + 0.9 * _reference_ties_merge(sparse, weights)
    assert torch.equal(_bits(got), _bits(want))


@pytest.fixture
def tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Chunks of 7 values for the consensus and 5 for the radix passes: every tensor is cut many times."""
    monkeypatch.setattr(consensus, "CHUNK_ELEMENTS", 7)
    monkeypatch.setattr(selection, "_CHUNK", 5)
    return 7


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("weights,density,normalize", [([1.0, 1.0, 1.0], 0.2, True), ([0.5, 1.5, -0.25], 0.5, False),
                                                       ([2.0, 1.0, 3.0], 0.3, True), ([0.5, 0.5, 1.0], 1.0, True)])
def test_ties_in_chunks_on_threads_keeps_the_bits(tiny_chunks: int, threads: int, weights, density, normalize) -> None:
    base, deltas = _awkward((13, 9), 3, seed=threads * 10 + int(density * 10))
    ctx = MergeContext(tensor_name="t", memo={}, expert_ids=("a", "b", "c"), threads=threads)
    got = get_method("ties").fn(base, deltas, ctx=ctx, weights=weights, density=density, normalize=normalize,
                                scale=0.7)
    want = _reference_ties(base, deltas, weights, density, normalize, 0.7)
    assert torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("threads", [1, 2])
def test_fallback_sign_comes_from_the_whole_tensor_not_the_chunk(tiny_chunks: int, threads: int) -> None:
    """The first chunk holds only entries whose mass is exactly 0 and more negative than positive sums; the
    rest of the tensor is mostly positive, so Σγ > 0 and the zero-mass entries take the positive agreeing
    values — which only a count over every chunk (and every thread's part) gets right."""
    a = torch.tensor([3.0, -2.0, 5.0, -1.0, 0.0, 4.0, -3.0] + [1.0] * 30 + [-1.0] * 5)
    b = torch.tensor([-3.0, 2.0, -5.0, 1.0, 0.0, -4.0, -1.0] + [1.0] * 30 + [-1.0] * 5)
    got = ties_consensus([a, b], [1.0, 1.0], threads=threads)
    want = _reference_ties_merge([a, b], [1.0, 1.0])
    assert torch.equal(_bits(got), _bits(want))
    # Hand-worked: entry 0 has mass 0, γ = +1 (30 positive sums against 6 negative), the agreeing value is 3.
    assert got[:7].tolist() == [3.0, 2.0, 5.0, 1.0, 0.0, 4.0, -2.0]


def test_no_entry_with_mass_and_no_majority_gives_plus_zero(tiny_chunks: int) -> None:
    x = torch.tensor([1.0, -2.0, -0.0, 0.0, 5.0, -5.0, 3.0, 2.5, -1.0])
    got = ties_consensus([x, -x], [1.0, 1.0], threads=2)
    assert torch.equal(_bits(got), _bits(torch.zeros(9)))


@pytest.mark.parametrize("threads", [1, 3])
def test_threshold_in_chunks_equals_kthvalue_on_awkward_values(tiny_chunks: int, threads: int) -> None:
    g = torch.Generator().manual_seed(4)
    cases = {
        "ties and zeros": torch.randint(-3, 4, (61,), generator=g).float(),
        "signed zeros": torch.tensor([0.0, -0.0, -0.0, 0.0, 1e-45, -1e-45, 0.0]),
        "all equal": torch.full((23,), -2.5),
        "subnormals and huge": torch.tensor([1e-40, -3e-39, 3e38, -3e38, 1.0, 2e-45, 0.0, 7.0]),
        "gaussian": torch.randn(97, generator=g) * 1e-3,
    }
    for label, x in cases.items():
        hist = magnitude_histogram(x, threads=threads)
        for density in (0.01, 0.2, 0.5, 0.99, 1.0):
            k = keep_count(density, x.numel())
            want = torch.kthvalue(x.abs(), x.numel() - k + 1).values.item()
            assert kth_largest_magnitude(x, hist, k, threads=threads) == want, (label, density)


def test_trim_keeps_entries_equal_to_the_threshold_and_a_zero_threshold_keeps_all() -> None:
    x = torch.tensor([0.5, -0.5, 0.25, -1.0, 0.0, -0.0])
    # threshold 0.5: |x| ≥ 0.5 survive (both signs, ties kept); a single expert's consensus returns them.
    assert ties_consensus([x], [1.0], thresholds=[0.5]).tolist() == [0.5, -0.5, 0.0, -1.0, 0.0, 0.0]
    assert torch.equal(ties_consensus([x], [1.0], thresholds=[0.0]), x + 0.0)
