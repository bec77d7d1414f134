"""TIES and its hosts keep their bits: the faster forms (one |τ| per expert, a density-free radix histogram,
x·γ > 0 for agreement, sums started at the first term) against the straightforward formulas written out here,
with the threshold from ``torch.kthvalue``, on inputs full of the awkward cases (±0, equal magnitudes at the
threshold, entries whose signed mass is exactly zero, negative and fractional weights)."""

from __future__ import annotations

import pytest
import torch

from omnimerge.algorithms.base import MergeContext
from omnimerge.algorithms.consensus import ties_merge
from omnimerge.algorithms.registry import get_method


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
        gamma = torch.where(zero, torch.sign(gamma.sum()), gamma)
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
