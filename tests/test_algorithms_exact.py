"""Each method on tiny tensors against outputs worked out by hand (the working is in the comments).

Random methods (DARE, DELLA) are checked against masks rebuilt independently from the same seeded
generator the method must use.
"""

from __future__ import annotations

import math

import pytest
import torch

from omnimerge.algorithms import MergeContext, get_method
from omnimerge.algorithms.selection import RadixSelect, TiesThresholdPrepass, kth_largest_abs

T = torch.tensor
CTX = MergeContext(tensor_name="t", seed=0, expert_ids=("a", "b", "c"))


def run(name: str, base: torch.Tensor, deltas: list[torch.Tensor], ctx: MergeContext = CTX, **params) -> torch.Tensor:
    return get_method(name).fn(base, deltas, ctx=ctx, **params)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=atol, rtol=0), f"{a} != {b}"


# ---- TIES ------------------------------------------------------------------------------------------

def test_ties_trim_elect_disjoint_mean_with_threshold_ties() -> None:
    # density 0.5 on 4 entries → k = 2 per expert.
    # τ₁ = [4, -1, 2, -3]: 2nd largest |τ| = 3          → τ̂₁ = [4, 0, 0, -3]
    # τ₂ = [-2, 3, 1, -1]: 2nd largest = 2              → τ̂₂ = [-2, 3, 0, 0]
    # τ₃ = [1, -1, -5, 1]: 2nd largest = 1, ties kept   → τ̂₃ = [1, -1, -5, 1]
    # Σ τ̂ = [3, 2, -5, -2] → γ = [+, +, -, -]
    # agreeing: [4, 1] → 2.5;  [3] → 3;  [-5] → -5;  [-3] → -3     (entry 3: τ̂₃ = +1 disagrees)
    # θ = base 1 + [2.5, 3, -5, -3]
    deltas = [T([4.0, -1, 2, -3]), T([-2.0, 3, 1, -1]), T([1.0, -1, -5, 1])]
    out = run("ties", torch.ones(4), deltas, density=0.5)
    close(out, T([3.5, 4.0, -4.0, -2.0]))


def test_ties_zero_mass_takes_the_tensor_wide_sign() -> None:
    # density 1 keeps everything. τ₁ = [2, -1, -3, 1], τ₂ = [-2, -1, -1, 1]
    # Σ = [0, -2, -4, 2] → γ = [0, -1, -1, +1]; Σγ = -1 → entry 0 elects -1 (mergekit would elect +1)
    # entry 0: only τ₂ = -2 agrees → -2;  entry 1: (-1 - 1)/2 = -1;  entry 2: (-3 - 1)/2 = -2;  entry 3: 1
    out = run("ties", torch.zeros(4), [T([2.0, -1, -3, 1]), T([-2.0, -1, -1, 1])], density=1.0)
    close(out, T([-2.0, -1.0, -2.0, 1.0]))


def test_ties_all_zero_mass_elects_nothing() -> None:
    # Σ = [0, 0] → γ = 0 everywhere, Σγ = 0 → nothing agrees → τ_m = 0
    out = run("ties", torch.full((2,), 7.0), [T([1.0, -1]), T([-1.0, 1])], density=1.0)
    close(out, T([7.0, 7.0]))


def test_ties_weights_as_mergekit() -> None:
    # weighted τ: 2·[1, -2] = [2, -4];  0.5·[3, 1] = [1.5, 0.5];  Σ = [3.5, -3.5] → γ = [+, -]
    # normalize: entry 0 (2 + 1.5)/(2 + 0.5) = 1.4;  entry 1: -4 / 2 = -2
    # without:   entry 0: 3.5;  entry 1: -4
    deltas = [T([1.0, -2]), T([3.0, 1])]
    close(run("ties", torch.zeros(2), deltas, weights=[2.0, 0.5], density=1.0), T([1.4, -2.0]))
    close(run("ties", torch.zeros(2), deltas, weights=[2.0, 0.5], density=1.0, normalize=False), T([3.5, -4.0]))
    close(run("ties", torch.zeros(2), deltas, weights=[2.0, 0.5], density=1.0, scale=0.5), T([0.7, -1.0]))


def _model_stats(tensors_per_expert: dict[str, list[torch.Tensor]], density: float) -> dict:
    pre = get_method("ties").prepass({"scope": "model", "density": density})
    assert isinstance(pre, TiesThresholdPrepass) and pre.passes == 2
    result = {}
    for eid, tensors in tensors_per_expert.items():
        state = pre.new_state({"scope": "model", "density": density})
        for p in range(pre.passes):
            for t in tensors:
                pre.update(state, p, t)
            pre.end_pass(state, p)
        result[eid] = pre.result(state)
    return {pre.stat_key: result}


def test_ties_model_scope_uses_one_threshold_per_expert() -> None:
    # expert a: X = [1, -5], Y = [2, 0.5, -3]; density 0.6 over 5 entries → k = 3 → 3rd largest of
    # {1, 5, 2, 0.5, 3} = 2. Trim at 2: X → [0, -5], Y → [2, 0, -3].
    # Per tensor instead: X k = ⌊1.2⌋ = 1 → [0, -5]; Y k = ⌊1.8⌋ = 1 → [0, 0, -3].
    X, Y = T([1.0, -5]), T([2.0, 0.5, -3])
    stats = _model_stats({"a": [X, Y]}, 0.6)
    assert stats["ties_threshold"]["a"] == 2.0
    assert get_method("ties").prepass({"scope": "tensor"}) is None
    ctx = MergeContext(tensor_name="Y", expert_ids=("a",), model_stats=stats)
    close(run("ties", torch.zeros(3), [Y], ctx=ctx, density=0.6, scope="model"), T([2.0, 0.0, -3.0]))
    close(run("ties", torch.zeros(3), [Y], density=0.6), T([0.0, 0.0, -3.0]))


def test_ties_model_scope_finds_its_density_among_several_rules() -> None:
    # the engine keys later rules by (expert id, params pairs) as well as by expert id
    stats = {"ties_threshold": {"a": 9.0, ("a", (("density", 0.6), ("scope", "model"))): 2.0,
                                ("a", (("density", 0.3), ("scope", "model"))): 9.0}}
    ctx = MergeContext(tensor_name="Y", expert_ids=("a",), model_stats=stats)
    close(run("ties", torch.zeros(3), [T([2.0, 0.5, -3])], ctx=ctx, density=0.6, scope="model"), T([2.0, 0.0, -3.0]))


def test_ties_model_scope_without_stats_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="pre-pass"):
        run("ties", torch.zeros(2), [T([1.0, 2.0])], scope="model")


@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.999, 1.0])
def test_radix_select_equals_kthvalue_on_the_concatenation(density: float) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(17, 5, generator=g) * 1e-3, torch.randn(300, generator=g),
               torch.tensor([0.0, -0.0, 2.5, -2.5, 2.5, 1e-30, -7e-39]), torch.randn(3, 4, 2, generator=g) * 1e4]
    flat = torch.cat([t.reshape(-1).abs() for t in tensors])
    k = max(1, int(density * flat.numel()))
    expected = torch.kthvalue(flat, flat.numel() - k + 1).values.item()
    sel = RadixSelect(density=density)
    for p in (0, 1):
        for t in reversed(tensors):  # order does not matter
            sel.update(p, t)
        sel.end_pass(p)
    assert sel.value == expected
    assert kth_largest_abs(tensors, k) == expected


def test_per_tensor_threshold_equals_kthvalue() -> None:
    from omnimerge.algorithms.sparsify import magnitude_threshold

    g = torch.Generator().manual_seed(9)
    for shape in [(7,), (13, 11), (3, 4, 5)]:
        x = torch.randn(shape, generator=g)
        for density in (0.05, 0.2, 0.9, 1.0):
            k = max(1, int(density * x.numel()))
            expected = torch.kthvalue(x.reshape(-1).abs(), x.numel() - k + 1).values
            assert torch.equal(magnitude_threshold(x, density), expected)


# ---- DARE ------------------------------------------------------------------------------------------

def test_dare_masks_come_from_the_seeded_generator() -> None:
    # entry kept where u ≥ p (u ~ U[0,1) from ctx.generator("dare", expert id)), survivors / (1 - p)
    g = torch.Generator().manual_seed(2)
    deltas = [torch.randn(6, 5, generator=g) for _ in range(2)]
    ctx = MergeContext(tensor_name="layers.0.q", seed=11, expert_ids=("x", "y"))
    p = 0.3
    expected = []
    for i, d in enumerate(deltas):
        u = torch.rand(d.shape, generator=ctx.generator("dare", ctx.expert_id(i)))
        expected.append(torch.where(u >= p, d / (1 - p), torch.zeros(())))
    close(run("dare_linear", torch.zeros(6, 5), deltas, ctx=ctx, p=p), expected[0] + expected[1])
    # dare_ties with no trim: TIES on the same DARE'd vectors
    ties_ref = run("ties", torch.zeros(6, 5), expected, ctx=ctx, density=1.0)
    close(run("dare_ties", torch.zeros(6, 5), deltas, ctx=ctx, p=p, density=1.0), ties_ref)


def test_dare_with_p_zero_is_its_host() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 4, generator=g)
    deltas = [torch.randn(4, 4, generator=g) for _ in range(3)]
    close(run("dare_linear", base, deltas, p=0.0, scale=0.7), run("task_arithmetic", base, deltas, scale=0.7))
    close(run("dare_ties", base, deltas, p=0.0, density=0.4), run("ties", base, deltas, density=0.4))


def test_dare_keeps_about_one_minus_p() -> None:
    d = torch.ones(200, 200)
    out = run("dare_linear", torch.zeros(200, 200), [d], p=0.2)
    kept = float((out != 0).float().mean())
    assert abs(kept - 0.8) < 0.01
    assert torch.allclose(out[out != 0], torch.full((), 1.25))


# ---- DELLA -----------------------------------------------------------------------------------------

def test_della_rank_based_keep_probabilities() -> None:
    # row [0.1, -0.4, 0.3], density 0.5, ε 0.1: ascending ranks 0, 2, 1 → normalised 0, 1, 0.5
    # keep probabilities 0.4 + 0.2·[0, 1, 0.5] = [0.4, 0.6, 0.5]; kept where u < p, divided by p.
    d = T([[0.1, -0.4, 0.3]])
    probs = T([[0.4, 0.6, 0.5]])
    ctx = MergeContext(tensor_name="w", seed=5, expert_ids=("a",))
    u = torch.rand(d.shape, generator=ctx.generator("della", "a"))
    expected = torch.where(u < probs, d / probs, torch.zeros(()))
    close(run("della", torch.zeros(1, 3), [d], ctx=ctx, density=0.5, epsilon=0.1, consensus=False, normalize=False),
          expected)


# ---- SVD methods -----------------------------------------------------------------------------------

def test_tsv_orthogonalises_concatenated_singular_vectors() -> None:
    # N = 2, 2×2 → r = 1.  τ₁ = diag(3, 1): top (3, e₁, e₁).
    # τ₂ = 2·u e₂ᵀ + 0.5·u⊥ e₁ᵀ, u = (1,1)/√2, u⊥ = (1,-1)/√2: top (2, u, e₂).
    # U = [e₁, u] (columns at 0° and 45°); its polar factor spreads them symmetrically about 22.5°
    # to -22.5° and 67.5°: [[c, s], [-s, c]], c = cos 22.5°, s = sin 22.5°.  V = [e₁, e₂] = I.
    # τ_m = U⊥ diag(3, 2) = [[3c, 2s], [-3s, 2c]].
    r2 = math.sqrt(0.5)
    u, u_perp = T([r2, r2]), T([r2, -r2])
    tau2 = 2 * torch.outer(u, T([0.0, 1])) + 0.5 * torch.outer(u_perp, T([1.0, 0]))
    c, s = math.cos(math.pi / 8), math.sin(math.pi / 8)
    out = run("tsv", torch.zeros(2, 2), [torch.diag(T([3.0, 1])), tau2])
    close(out, T([[3 * c, 2 * s], [-3 * s, 2 * c]]))


def test_tsv_with_orthogonal_experts_keeps_their_top_components() -> None:
    # τ₁ = diag(3, 1, 0, 0) → r = 4/2 = 2: (3, e₁), (1, e₂); τ₂ = diag(0, 0, 5, 2): (5, e₃), (2, e₄)
    out = run("tsv", torch.ones(4, 4), [torch.diag(T([3.0, 1, 0, 0])), torch.diag(T([0.0, 0, 5, 2]))])
    close(out, torch.ones(4, 4) + torch.diag(T([3.0, 1, 5, 2])))


def test_iso_c_flattens_the_spectrum_of_the_sum() -> None:
    # Σ = diag(3,1) + diag(1,1) = diag(4, 2) → mean σ = 3 → 3·I
    close(run("iso_c", torch.zeros(2, 2), [torch.diag(T([3.0, 1])), torch.diag(T([1.0, 1]))]), 3 * torch.eye(2))
    # Σ = [[0, 2], [1, 0]] = I·diag(2, 1)·Vᵀ with V = [[0, 1], [1, 0]] → U Vᵀ = [[0, 1], [1, 0]], mean 1.5
    out = run("iso_c", torch.zeros(2, 2), [T([[0.0, 2], [0, 0]]), T([[0.0, 0], [1, 0]])], scale=2.0)
    close(out, T([[0.0, 3.0], [3.0, 0.0]]))
    # rank-deficient Σ = diag(2, 0): only the non-zero direction is used → 2·e₁e₁ᵀ
    e = torch.diag(T([1.0, 0]))
    close(run("iso_c", torch.zeros(2, 2), [e, e]), torch.diag(T([2.0, 0])))


def test_iso_cts_common_and_task_specific_subspaces() -> None:
    # d = 4, N = 2, f = 0.25: k = ⌊1.0⌋ = 1; task total = round(3/2)·2 = 4 → k = 0, 2 per task.
    # τ₁ = diag(5, 0, 2, 1.5): top 2 (5, e₁), (2, e₃);  τ₂ = diag(0, 4, 0, 0): (4, e₂) (rank 1)
    # U = [e₁, e₃, e₂] already orthonormal; σ̄ = (5 + 2 + 4)/3 = 11/3 → diag(11/3, 11/3, 11/3, 0)
    # (Iso-C would give mean(5, 4, 2, 1.5) = 3.125 times I.)
    d1, d2 = torch.diag(T([5.0, 0, 2, 1.5])), torch.diag(T([0.0, 4, 0, 0]))
    out = run("iso_cts", torch.zeros(4, 4), [d1, d2], common_space_fraction=0.25)
    close(out, torch.diag(T([11 / 3, 11 / 3, 11 / 3, 0.0])))
    close(run("iso_c", torch.zeros(4, 4), [d1, d2]), 3.125 * torch.eye(4))


def test_iso_cts_with_all_common_space_is_iso_c() -> None:
    g = torch.Generator().manual_seed(4)
    base = torch.randn(6, 5, generator=g)
    deltas = [torch.randn(6, 5, generator=g) for _ in range(3)]
    close(run("iso_cts", base, deltas, common_space_fraction=1.0), run("iso_c", base, deltas), atol=1e-5)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "wudi", "optmerge"])
def test_two_d_methods_refuse_other_shapes(name: str) -> None:
    spec = get_method(name)
    assert spec.handles == "2d" and spec.fallback == "weight_average"
    with pytest.raises(ValueError, match="2-D"):
        run(name, torch.zeros(3), [torch.ones(3), torch.ones(3)])


# ---- WUDI / OptMerge, one step by hand -------------------------------------------------------------

def test_wudi_one_adam_step_by_hand() -> None:
    # m = 1, n = 2: τ₁ = [1, 0] (‖τ₁‖² = 1), τ₂ = [1, 1] (‖τ₂‖² = 2); G₁ = e₁e₁ᵀ, G₂ = [[1,1],[1,1]]/2
    # T₀ = Σ τ = [2, 1]; (T₀−τ₁)G₁ = [1, 0]; (T₀−τ₂)G₂ = [1, 0]G₂ = [0.5, 0.5]; ∇ = 2·[1.5, 0.5] = [3, 1]
    # Adam's first step moves by lr·g/|g| (bias-corrected): T₁ = [2, 1] − 0.1·[1, 1] = [1.9, 0.9]
    deltas = [T([[1.0, 0]]), T([[1.0, 1]])]
    close(run("wudi", torch.zeros(1, 2), deltas, lr=0.1, steps=1), T([[1.9, 0.9]]))


def test_sgd_momentum_two_steps_by_hand() -> None:
    # Same problem, WUDI loss through optmerge's switches, SGD lr 0.1, momentum 0.9:
    # step 1: g₁ = [3, 1], buf = g₁, T₁ = [1.7, 0.9]
    # step 2: (T₁−τ₁)G₁ = [0.7, 0]; (T₁−τ₂)G₂ = [0.7, −0.1]G₂ = [0.3, 0.3]; g₂ = 2·[1.0, 0.3] = [2, 0.6]
    #         buf = 0.9·[3, 1] + [2, 0.6] = [4.7, 1.5]; T₂ = [1.7, 0.9] − 0.1·[4.7, 1.5] = [1.23, 0.75]
    deltas = [T([[1.0, 0]]), T([[1.0, 1]])]
    out = run("optmerge", torch.zeros(1, 2), deltas, variant="lora", optimizer="sgd", init="sum", low_rank=False,
              lr=0.1, momentum=0.9, steps=2, scale=1.0)
    close(out, T([[1.23, 0.75]]))


# ---- slerp, model_stock, breadcrumbs ---------------------------------------------------------------

def test_slerp_by_hand() -> None:
    # v₀ = e₁, v₁ = e₂: Ω = 90°.  t = ½: sin 45°/sin 90° each → (√½, √½).  t = ⅓: (sin 60°, sin 30°)
    e1, e2 = T([1.0, 0]), T([0.0, 1])
    close(run("slerp", torch.zeros(2), [e1, e2], t=0.5), T([math.sqrt(0.5), math.sqrt(0.5)]))
    close(run("slerp", torch.zeros(2), [e1, e2], t=1 / 3), T([math.sin(math.pi / 3), 0.5]))
    # norms are not renormalised: v₀ = [2, 0], v₁ = [0, 4], t = ½ → √½·[2, 4]
    close(run("slerp", torch.zeros(2), [2 * e1, 4 * e2], t=0.5), T([2.0, 4.0]) * math.sqrt(0.5))
    # base enters through θᵢ = θ₀ + τᵢ: θ₀ = [1, 0], τ = [0, 0] and [-1, 1] → v = e₁, e₂
    close(run("slerp", e1, [torch.zeros(2), T([-1.0, 1])], t=0.5), T([math.sqrt(0.5), math.sqrt(0.5)]))


def test_slerp_near_parallel_is_lerp_and_needs_two_experts() -> None:
    # v₀ = [1, 0], v₁ = [2, 1e-4]: cos ≈ 1 > 0.9995 → (v₀ + v₁)/2
    close(run("slerp", torch.zeros(2), [T([1.0, 0]), T([2.0, 1e-4])], t=0.5), T([1.5, 5e-5]), atol=1e-7)
    with pytest.raises(ValueError, match="exactly 2"):
        run("slerp", torch.zeros(2), [T([1.0, 0])])
    assert get_method("slerp").max_experts == 2 and not get_method("slerp").symmetric


def test_model_stock_by_hand() -> None:
    # τ₁ = [1, 0], τ₂ = [1, 1]: cos = 1/√2; t = 2c/(1 + c) = 2(√2 − 1); mean τ = [1, 0.5]
    t = 2 * (math.sqrt(2) - 1)
    close(run("model_stock", torch.zeros(2), [T([1.0, 0]), T([1.0, 1])]), T([t, t / 2]))
    # orthogonal task vectors: cos 0 → t = 0 → base
    close(run("model_stock", torch.ones(2), [T([1.0, 0]), T([0.0, 1])]), torch.ones(2))
    # filter-wise: row 0 orthogonal (t = 0), row 1 parallel (cos 1 → t = 2/2 = 1, mean [1, 0])
    out = run("model_stock", torch.zeros(2, 2), [T([[1.0, 0], [1, 0]]), T([[0.0, 1], [1, 0]])], filter_wise=True)
    close(out, T([[0.0, 0], [1, 0]]))


def test_breadcrumbs_drops_outliers_and_small_entries() -> None:
    # n = 10, density 0.5 → keep 5; γ 0.1 → drop the top 1; bottom 10 − 5 − 1 = 4 dropped.
    # τ₁ by |·|: 0.05(5) 0.1(0) 0.2(8) 0.3(3) | 0.6(9) 1(4) 2(2) 3(6) 4(7) | 5(1)
    #   → τ̃₁ = [0, 0, 2, 0, 1, 0, -3, 4, 0, -0.6]
    # τ₂ = ones: equal magnitudes ranked by position → keep positions 4..8
    # weights [1, 0.5]: τ̃₁ + 0.5·τ̃₂
    tau1 = T([0.1, -5, 2, -0.3, 1, 0.05, -3, 4, 0.2, -0.6])
    out = run("breadcrumbs", torch.zeros(10), [tau1, torch.ones(10)], weights=[1.0, 0.5], density=0.5, gamma=0.1)
    close(out, T([0.0, 0, 2, 0, 1.5, 0.5, -2.5, 4.5, 0.5, -0.6]))
    # γ·n < 1 → nothing dropped at the top (mergekit's indices[n_bot:-0] would keep nothing)
    out = run("breadcrumbs", torch.zeros(10), [tau1], density=0.5, gamma=0.01)
    close(out, T([0.0, -5, 2, 0, 1, 0, -3, 4, 0, 0]))
