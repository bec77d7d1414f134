"""Properties every registered method must have, checked over the whole registry with hypothesis.

A new method gets these for free: experts equal to the base give the base; shape and dtype are kept;
the same seed gives the same bytes (whatever the order tensors are merged in); permuting the experts
does not change the output where the spec says ``symmetric``; LowRank task vectors give the dense
result where the spec says ``accepts_lowrank``; the recipe validator names every problem.
"""

from __future__ import annotations

import inspect
import pathlib

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from omnimerge.algorithms import LowRank, MergeContext, get_method, method_names, validate_params
from omnimerge.algorithms.registry import MethodSpec

NAMES = method_names()
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The optimising methods run their full default step count; keep them on few examples.
FAST_SETTINGS = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _settings_for(name: str):
    return FAST_SETTINGS if name in ("wudi", "optmerge") else SETTINGS


@st.composite
def problems(draw, spec: MethodSpec):
    """(base, deltas, weights, ctx) of a shape the method handles and an allowed expert count."""
    low = max(2, spec.min_experts)
    high = spec.max_experts or 5
    n_exp = draw(st.integers(low, high))
    if spec.handles == "2d" or draw(st.booleans()):
        shape = (draw(st.integers(2, 9)), draw(st.integers(2, 9)))
    else:
        shape = (draw(st.integers(2, 30)),)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    deltas = [torch.randn(shape, generator=g) * 0.1 for _ in range(n_exp)]
    weights = [draw(st.floats(0.25, 2.0)) for _ in range(n_exp)] if spec.uses_weights else None
    ctx = MergeContext(tensor_name=f"model.layers.{seed % 7}.w", seed=seed % 1000,
                       expert_ids=tuple(f"expert{i}" for i in range(n_exp)))
    return base, deltas, weights, ctx


def _call(spec: MethodSpec, base, deltas, weights, ctx) -> torch.Tensor:
    return spec.fn(base, deltas, ctx=ctx, weights=weights)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("name", NAMES)
def test_experts_equal_to_base_give_base_shape_and_dtype(name: str) -> None:
    spec = get_method(name)

    @_settings_for(name)
    @given(problems(spec))
    def check(problem) -> None:
        base, deltas, weights, ctx = problem
        out = _call(spec, base, [torch.zeros_like(base) for _ in deltas], weights, ctx)
        assert out.dtype == torch.float32 and out.shape == base.shape
        assert torch.equal(out, base)
        merged = _call(spec, base, deltas, weights, ctx)
        assert merged.dtype == torch.float32 and merged.shape == base.shape
        assert torch.isfinite(merged).all()

    check()


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes_in_any_order(name: str) -> None:
    spec = get_method(name)

    @_settings_for(name)
    @given(problems(spec), problems(spec))
    def check(p1, p2) -> None:
        first = [_call(spec, *p) for p in (p1, p2)]
        second = [_call(spec, *p) for p in (p2, p1)][::-1]
        for a, b in zip(first, second):
            assert torch.equal(a, b)

    check()


@pytest.mark.parametrize("name", [n for n in NAMES if get_method(n).random])
def test_random_methods_depend_on_seed_and_tensor_name(name: str) -> None:
    spec = get_method(name)
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(32, 32)
    deltas = [torch.randn(32, 32, generator=g) for _ in range(2)]
    ids = ("a", "b")
    out = {key: _call(spec, base, deltas, None, MergeContext(tensor_name=key[0], seed=key[1], expert_ids=ids))
           for key in [("w", 1), ("w", 2), ("v", 1)]}
    assert not torch.equal(out[("w", 1)], out[("w", 2)])
    assert not torch.equal(out[("w", 1)], out[("v", 1)])


@pytest.mark.parametrize("name", [n for n in NAMES if get_method(n).symmetric])
def test_permuting_experts_does_not_change_symmetric_methods(name: str) -> None:
    spec = get_method(name)

    @_settings_for(name)
    @given(problems(spec), st.randoms(use_true_random=False))
    def check(problem, rnd) -> None:
        base, deltas, weights, ctx = problem
        order = list(range(len(deltas)))
        rnd.shuffle(order)
        ctx2 = MergeContext(tensor_name=ctx.tensor_name, seed=ctx.seed,
                            expert_ids=tuple(ctx.expert_ids[i] for i in order))
        w2 = None if weights is None else [weights[i] for i in order]
        a = _call(spec, base, deltas, weights, ctx)
        b = _call(spec, base, [deltas[i] for i in order], w2, ctx2)
        assert _rel(b - base, a - base) < 1e-4 or float((a - b).abs().max()) < 1e-6

    check()


@pytest.mark.parametrize("name", [n for n in NAMES if get_method(n).accepts_lowrank])
def test_lowrank_input_equals_its_dense_form(name: str) -> None:
    spec = get_method(name)

    @_settings_for(name)
    @given(st.integers(2, 4), st.integers(3, 10), st.integers(3, 10), st.integers(1, 4), st.integers(0, 2**31 - 1))
    def check(n_exp, m, n, rank, seed) -> None:
        if name == "iso_cts":
            # Iso-CTS is ill-conditioned when the summed rank lies between the common size and min(m, n):
            # every residual then lives in the same few directions (documented in iso_cts).
            d = min(m, n)
            common = d - round((d - int(0.8 * d)) / n_exp) * n_exp
            assume(n_exp * rank <= common or n_exp * rank >= d)
        g = torch.Generator().manual_seed(seed)
        lrs = [LowRank(torch.randn(m, rank, generator=g), torch.randn(rank, n, generator=g) * 0.1, 0.5)
               for _ in range(n_exp)]
        base = torch.randn(m, n, generator=g)
        ids = tuple(f"e{i}" for i in range(n_exp))
        a = spec.fn(base, lrs, ctx=MergeContext(tensor_name="w", expert_ids=ids))
        b = spec.fn(base, [x.dense() for x in lrs], ctx=MergeContext(tensor_name="w", expert_ids=ids))
        assert _rel(a - base, b - base) < 1e-4 or float((a - b).abs().max()) < 1e-5

    check()


def test_registry_names_match_functions_and_files() -> None:
    assert set(NAMES) >= {"weight_average", "task_arithmetic", "linear", "ties", "dare_linear", "dare_ties", "tsv",
                          "iso_c", "iso_cts", "wudi", "optmerge", "slerp", "model_stock", "breadcrumbs", "della"}
    for name in NAMES:
        spec = get_method(name)
        assert spec.fn.__name__ == name
        assert pathlib.Path(inspect.getfile(spec.fn)).stem == name
        assert spec.reference and spec.summary
        assert spec.fallback is None or spec.fallback in NAMES


@pytest.mark.parametrize("name,params,needle", [
    ("ties", {"density": 1.5}, "must lie in (0, 1]"),
    ("ties", {"scope": "layer"}, "must be one of 'tensor', 'model'"),
    ("ties", {"densty": 0.3}, "Did you mean 'density'?"),
    ("dare_linear", {"p": 1.0}, "must lie in [0, 1)"),
    ("dare_ties", {"p": "high"}, "expected a number"),
    ("slerp", {"t": 2}, "must lie in [0, 1]"),
    ("optmerge", {"variant": "lor"}, "must be one of 'full', 'lora'"),
    ("optmerge", {"optimiser": "sgd"}, "Did you mean 'optimizer'?"),
    ("optmerge", {"low_rank": "yes"}, "expected true/false"),
    ("optmerge", {"steps": 2.5}, "expected an integer"),
    ("optmerge", {"lr": 0}, "must lie in (0, inf]"),
    ("iso_cts", {"common_space_fraction": -0.1}, "must lie in [0, 1]"),
    ("della", {"epsilon": 0.7}, "must lie in [0, 0.5]"),
])
def test_validate_params_names_each_problem(name: str, params: dict, needle: str) -> None:
    problems = validate_params(name, params)
    assert len(problems) == 1 and needle in problems[0], problems


def test_validate_params_reports_everything_at_once() -> None:
    problems = validate_params("optmerge", {"variant": "x", "stepz": 3, "lr": -1.0})
    assert len(problems) == 3
    assert validate_params("optmerge", {"variant": "lora", "optimizer": "adam", "low_rank": False, "steps": 10}) == []
    assert "Did you mean 'ties'?" in validate_params("tie", {})[0]
    assert "exactly" not in validate_params("slerp", {}, n_experts=2) and validate_params("slerp", {}, n_experts=3)
    assert validate_params("model_stock", {}, n_experts=1)
