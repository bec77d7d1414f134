"""WUDI and OptMerge: the closed-form fast path follows the naive autograd + torch.optim trajectory.

The reference (``benchmarks/naive_reference.py``) builds the papers' loss per step from the stacked task
vectors, differentiates it with autograd and steps ``torch.optim.Adam``/``SGD``. The fast path must end
within a relative difference of 1e-5 after the full step count — both of T and of T's displacement from
its starting point (the part the optimiser contributes) — on random problems of several shapes.
"""

from __future__ import annotations

import pytest
import torch

from omnimerge.algorithms import LowRank, MergeContext, get_method
from omnimerge.algorithms.methods.optmerge import optmerge, optmerge_batched
from omnimerge.algorithms.methods.wudi import wudi, wudi_batched
from omnimerge.algorithms.quadratic import build_quadratic, choose_form, minimise
from omnimerge.benchmarks.naive_reference import naive_optmerge, naive_wudi

# (m, n, N): square, tall, very tall, wide — N from 2 to 6 across them.
CASES = [(20, 20, 2), (24, 16, 3), (40, 12, 6), (12, 40, 5), (12, 40, 2), (16, 24, 4)]
TOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one thread is fastest and keeps the shared machine free."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

FULL = dict(demean=True, init="sum", optimizer="adam", lr=1e-5)
LORA = dict(demean=False, init="mean", optimizer="sgd", lr=1e-4, momentum=0.9)


def _deltas(m: int, n: int, n_exp: int, seed: int, scale: float = 1e-3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, n, generator=g) * scale for _ in range(n_exp)]


def _close(fast: torch.Tensor, ref: torch.Tensor, start: torch.Tensor) -> None:
    rel = float((fast - ref).norm() / ref.norm())
    moved = ref - start
    rel_move = float(((fast - start) - moved).norm() / moved.norm())
    assert moved.norm() > 0
    assert rel < TOL, f"relative difference of T {rel:.2e}"
    assert rel_move < TOL, f"relative difference of the displacement {rel_move:.2e}"


@pytest.mark.parametrize("m,n,n_exp", CASES)
def test_wudi_matches_autograd(m: int, n: int, n_exp: int) -> None:
    shape = (m, n)
    ds = _deltas(*shape, n_exp, seed=n_exp)
    ref = naive_wudi(ds, lr=1e-5, steps=300)
    fast = wudi(torch.zeros(shape), ds, ctx=MergeContext())
    _close(fast, ref, sum(ds))


@pytest.mark.parametrize("m,n,n_exp", CASES)
@pytest.mark.parametrize("variant", ["full", "lora"])
def test_optmerge_matches_autograd(m: int, n: int, n_exp: int, variant: str) -> None:
    shape = (m, n)
    ds = _deltas(*shape, n_exp, seed=10 + n_exp)
    kw = FULL if variant == "full" else LORA
    ref = naive_optmerge(ds, steps=300, **kw)
    fast = optmerge(torch.zeros(shape), ds, ctx=MergeContext(), variant=variant, scale=1.0)
    start = sum(ds) if kw["init"] == "sum" else sum(ds) / n_exp
    _close(fast, ref, start)


# PAPER.md Table 5 (Qwen2-VL): each row is one recipe of optmerge's switches.
TABLE5 = [
    ({"optimizer": "adam", "init": "sum", "low_rank": False}, dict(demean=False, init="sum", optimizer="adam", lr=1e-5, low_rank=False)),
    ({"init": "sum", "low_rank": False}, dict(demean=False, init="sum", optimizer="sgd", lr=1e-4, momentum=0.9, low_rank=False)),
    ({"low_rank": False}, dict(demean=False, init="mean", optimizer="sgd", lr=1e-4, momentum=0.9, low_rank=False)),
    ({}, dict(demean=False, init="mean", optimizer="sgd", lr=1e-4, momentum=0.9, low_rank=True)),
]


@pytest.mark.parametrize("switches,reference", TABLE5)
def test_table5_rows_are_recipes(switches: dict, reference: dict) -> None:
    ds = _deltas(18, 14, 5, seed=3)
    ref = naive_optmerge(ds, steps=300, **reference)
    fast = optmerge(torch.zeros(18, 14), ds, ctx=MergeContext(), variant="lora", **switches)
    start = sum(ds) if reference["init"] == "sum" else sum(ds) / 5
    _close(fast, ref, start)


def test_wudi_row_of_table5_is_wudi_bit_for_bit() -> None:
    ds = _deltas(10, 7, 3, seed=4)
    a = optmerge(torch.zeros(10, 7), ds, ctx=MergeContext(), variant="lora", optimizer="adam", init="sum",
                 low_rank=False)
    b = wudi(torch.zeros(10, 7), ds, ctx=MergeContext())
    assert torch.equal(a, b)


def test_sgd_without_momentum_and_other_lr() -> None:
    ds = _deltas(16, 16, 3, seed=5)
    ref = naive_optmerge(ds, steps=50, demean=True, init="mean", optimizer="sgd", lr=3e-4, momentum=0.0)
    fast = optmerge(torch.zeros(16, 16), ds, ctx=MergeContext(), variant="full", optimizer="sgd", init="mean",
                    lr=3e-4, momentum=0.0, steps=50, scale=1.0)
    _close(fast, ref, sum(ds) / 3)


@pytest.mark.parametrize("form", ["gram", "factored"])
def test_both_gradient_forms_match_autograd(form: str) -> None:
    # A wide matrix with low-rank projectors: k = 8 // 2 = 4 per expert, W is 64×8.
    ds = _deltas(8, 64, 2, seed=6)
    ref = naive_optmerge(ds, steps=300, **LORA)
    targets, factors = [], []
    for d in ds:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        targets.append((u[:, :4] * s[:4]) @ vh[:4])
        factors.append(vh[:4].T * (s[:4] / d.norm()))
    problem = build_quadratic(targets, factors, steps=300, form=form)
    assert problem.form == form
    fast = minimise(sum(ds) / 2, problem, optimizer="sgd", steps=300, lr=1e-4, momentum=0.9)
    _close(fast, ref, sum(ds) / 2)


def test_form_is_chosen_by_flop_count() -> None:
    assert choose_form(8, 64, 8, steps=300) == "factored"  # 4·m·n·r ≪ 2·m·n²
    assert choose_form(1024, 1024, 5 * 1024, steps=300) == "gram"  # WUDI, square
    assert choose_form(1024, 4096, 5 * 204, steps=300) == "factored"  # OptMerge, wide
    assert choose_form(4096, 1024, 5 * 204, steps=300) == "gram"  # OptMerge, tall


@pytest.mark.parametrize("method", ["wudi", "full", "lora"])
def test_batched_path_matches_autograd_per_item(method: str) -> None:
    n_items, n_exp, m, n = 2, 4, 14, 10
    per_item = [_deltas(m, n, n_exp, seed=100 + b) for b in range(n_items)]
    deltas = [torch.stack([per_item[b][i] for b in range(n_items)]) for i in range(n_exp)]
    bases = torch.zeros(n_items, m, n)
    ctxs = [MergeContext(tensor_name=f"layer.{b}") for b in range(n_items)]
    if method == "wudi":
        out = wudi_batched(bases, deltas, ctxs=ctxs)
    else:
        out = optmerge_batched(bases, deltas, ctxs=ctxs, variant=method, scale=1.0)
    assert out.shape == (n_items, m, n)
    for b in range(n_items):
        ds = per_item[b]
        if method == "wudi":
            ref, start = naive_wudi(ds), sum(ds)
        else:
            kw = FULL if method == "full" else LORA
            ref = naive_optmerge(ds, steps=300, **kw)
            start = sum(ds) if kw["init"] == "sum" else sum(ds) / n_exp
        _close(out[b], ref, start)


def test_registry_exposes_batched_functions() -> None:
    assert get_method("wudi").batched is wudi_batched
    assert get_method("optmerge").batched is optmerge_batched


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_lowrank_deltas_match_their_dense_form(variant: str) -> None:
    g = torch.Generator().manual_seed(7)
    lrs = [LowRank(torch.randn(16, 3, generator=g) * 0.03, torch.randn(3, 12, generator=g) * 0.03, 2.0) for _ in range(3)]
    dense = [x.dense() for x in lrs]
    a = optmerge(torch.zeros(16, 12), lrs, ctx=MergeContext(), variant=variant, scale=1.0)
    b = optmerge(torch.zeros(16, 12), dense, ctx=MergeContext(), variant=variant, scale=1.0)
    assert float((a - b).norm() / b.norm()) < 1e-5
    c = wudi(torch.zeros(16, 12), lrs, ctx=MergeContext())
    d = wudi(torch.zeros(16, 12), dense, ctx=MergeContext())
    assert float((c - d).norm() / d.norm()) < 1e-5


def test_memo_shares_svds_and_the_solution_across_a_scale_sweep() -> None:
    ds = _deltas(12, 9, 3, seed=8)
    memo: dict = {}
    ctx = MergeContext(tensor_name="w", expert_ids=("a", "b", "c"), memo=memo)
    one = optmerge(torch.zeros(12, 9), ds, ctx=ctx, variant="full", scale=1.0)
    n_entries = len(memo)
    assert ("w", "svd", "a") in memo and n_entries >= 4
    half = optmerge(torch.zeros(12, 9), ds, ctx=ctx, variant="full", scale=0.5)
    assert len(memo) == n_entries  # nothing recomputed
    assert torch.equal(half, 0.5 * one)


def test_zero_task_vector_contributes_nothing() -> None:
    ds = _deltas(9, 6, 2, seed=9) + [torch.zeros(9, 6)]
    out = wudi(torch.zeros(9, 6), ds, ctx=MergeContext())
    assert torch.isfinite(out).all()


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="2-D"):
        wudi(torch.zeros(5), [torch.ones(5)], ctx=MergeContext())
    with pytest.raises(ValueError, match="2-D"):
        optmerge(torch.zeros(2, 3, 4), [torch.ones(2, 3, 4)], ctx=MergeContext())
    with pytest.raises(ValueError, match="momentum"):
        optmerge(torch.zeros(4, 4), [torch.ones(4, 4)], ctx=MergeContext(), optimizer="adam", momentum=0.9)
