"""Row-block streaming of element-wise merges (engine/row_stream.py): the bytes equal whole-tensor computations.

The reference for every test is computed here on whole tensors, without the engine: the base and expert tensors
read with safetensors, τᵢ = θᵢ − θ₀ in float32, the method function called once on the whole tensor (or, for
task arithmetic, the formula written out), cast once. The engine runs with blocks of a few values, so every
tensor is cut in many places (mid-row for 1-D tensors, one row per block for matrices).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnimerge.algorithms.base import MergeContext
from omnimerge.algorithms.registry import get_method
from omnimerge.engine import row_stream
from omnimerge.engine.errors import NonFiniteError
from omnimerge.engine.execute import LocalExecutor
from omnimerge.engine.merge import run_merge
from omnimerge.engine.plan import plan_merge
from omnimerge.engine.recipe import parse_recipe
from omnimerge.engine.row_stream import row_blocks
from omnimerge.engine.shard_runs import RunSlot, run_slots
from tiny_models import load_state_dict

EXPERTS = ("qwen_e0", "qwen_e1", "qwen_e2")
WEIGHTS = (1.0, 0.5, 0.25)


def _recipe(zoo: Path, method: str, params: dict, experts=EXPERTS, weights=WEIGHTS, **over):
    doc = {"base": str(zoo / "qwen_base"),
           "experts": {e: {"source": str(zoo / e), "weight": w} for e, w in zip(experts, weights)},
           "method": method, "parameters": params, "shard_size": "60KB", "seed": 11}
    doc.update(over)
    return parse_recipe(doc)


def _merge(recipe, out: Path):
    return run_merge(recipe, out, executor=LocalExecutor(), progress=False)


def _whole_reference(zoo: Path, recipe, experts=EXPERTS) -> dict[str, torch.Tensor]:
    """Every merged tensor computed on whole float32 tensors by the method function itself, cast once."""
    plan = plan_merge(recipe)
    ids = tuple(f"{e.label}@{e.fingerprint()[:16]}" for e in plan.experts)
    base = load_state_dict(zoo / "qwen_base")
    ex = [load_state_dict(zoo / e) for e in experts]
    out = {}
    for task in plan.tensors:
        if task.action != "merge":
            continue
        b = base[task.name].float()
        deltas = [e[task.name].float() - b for e in ex]
        ctx = MergeContext(tensor_name=task.name, seed=recipe.seed, expert_ids=ids)
        fn = get_method(task.method).fn
        out[task.name] = fn(b, deltas, ctx=ctx, weights=list(recipe.weights), **task.param_dict()).to(
            getattr(torch, {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}[task.out_dtype]))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(row_stream, "BLOCK_ELEMENTS", 7)  # 1-D tensors cut mid-way, matrices one row a block
    return 7


def test_row_blocks_cover_the_tensor_in_order() -> None:
    assert row_blocks((10,), "elements", 4) == [(0, 4), (4, 8), (8, 10)]
    assert row_blocks((10,), "rows", 4) == [(0, 10)]  # a 1-D tensor is one row
    assert row_blocks((5, 3), "rows", 7) == [(0, 2), (2, 4), (4, 5)]
    assert row_blocks((5, 30), "elements", 7) == [(i, i + 1) for i in range(5)]  # at least one row
    assert row_blocks((), "elements", 7) == [(0, 1)]
    assert row_blocks((0, 4), "elements", 7) == [(0, 0)]


def test_task_arithmetic_streamed_equals_the_formula_on_whole_tensors(zoo_dir: Path, tmp_path: Path,
                                                                      tiny_blocks: int) -> None:
    recipe = _recipe(zoo_dir, "task_arithmetic", {"scale": 0.7})
    _merge(recipe, tmp_path / "out")
    got = load_state_dict(tmp_path / "out")
    base = load_state_dict(zoo_dir / "qwen_base")
    ex = [load_state_dict(zoo_dir / e) for e in EXPERTS]
    merged = 0
    for name, b16 in base.items():
        b = b16.float()
        acc = torch.zeros_like(b)  # θ₀ + λ·Σ wᵢ(θᵢ − θ₀), whole tensors, float32, cast once
        for w, e in zip(WEIGHTS, ex):
            acc.add_(e[name].float() - b, alpha=w)
        want = (b + 0.7 * acc).to(b16.dtype)
        assert torch.equal(_bits(got[name]), _bits(want)), name
        merged += b.numel() > 1
    assert merged > 20


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"scale": 0.35}),
    ("weight_average", {"scale": 0.9}),
    ("linear", {"include_base": True, "base_weight": 0.5}),
    ("linear", {"normalize": False}),
    ("dare_linear", {"p": 0.3, "scale": 0.8}),
    ("della", {"consensus": False, "density": 0.6, "epsilon": 0.1}),
])
def test_streamed_methods_equal_whole_tensor_calls(zoo_dir: Path, tmp_path: Path, tiny_blocks: int,
                                                   method: str, params: dict) -> None:
    """Random methods too: DARE's and DELLA's draws run through the blocks as one stream per tensor."""
    recipe = _recipe(zoo_dir, method, params)
    _merge(recipe, tmp_path / "out")
    got = load_state_dict(tmp_path / "out")
    want = _whole_reference(zoo_dir, recipe)
    assert len(want) > 20
    for name, w in want.items():
        assert torch.equal(_bits(got[name]), _bits(w)), f"{method}: {name}"


def _run_jobs(recipe, tmp: Path, **kw) -> tuple[dict[str, bytes], dict]:
    plan = plan_merge(recipe)
    ids = tuple(f"{e.label}@{e.fingerprint()[:16]}" for e in plan.experts)
    files, totals = {}, {"streamed_tensors": 0, "blocks": 0}
    for job in plan.jobs:
        slot = RunSlot(run_id="r", job=job, experts=tuple(range(len(plan.experts))), weights=tuple(recipe.weights),
                       expert_ids=ids, seed=recipe.seed, staging=tmp, label="t")
        stats: dict = {}
        (outcome,) = run_slots([slot], plan.base, plan.experts, stats=stats, **kw)
        assert outcome.ok, outcome.error
        files[job.filename] = (tmp / job.filename).read_bytes()
        for key in totals:
            totals[key] += stats[key]
    return files, totals


@pytest.mark.parametrize("prefetch", [True, False])
def test_streamed_shards_equal_the_whole_tensor_path_with_a_lora_expert(zoo_dir: Path, tmp_path: Path,
                                                                        prefetch: bool) -> None:
    """LoRA-targeted tensors take the whole path (B·A is not row-independent); the others stream, the LoRA
    expert's untargeted tensors as zero task vectors. Shards are byte-equal to the whole-tensor path's."""
    experts = ("qwen_e0", "qwen_lora")
    recipe = _recipe(zoo_dir, "task_arithmetic", {"scale": 0.6}, experts=experts, weights=(0.5, 1.5))
    streamed, s_stats = _run_jobs(recipe, tmp_path / "streamed", block_elements=5, prefetch=prefetch)
    whole, w_stats = _run_jobs(recipe, tmp_path / "whole", stream=False)
    assert streamed == whole
    assert w_stats["streamed_tensors"] == 0
    n_tensors = len(plan_merge(recipe).tensors)
    lora_targets = len(plan_merge(recipe).experts[1].lora.targets)
    assert s_stats["streamed_tensors"] == n_tensors - lora_targets
    assert s_stats["blocks"] > 10 * s_stats["streamed_tensors"]


def test_parallel_blocks_give_the_bytes_of_one_block_at_a_time(zoo_dir: Path, tmp_path: Path) -> None:
    """Two blocks computed at once on two threads (each with its own buffers), written in order: the same
    shards as one block at a time and as the whole-tensor path; random methods go one block at a time."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)  # the job may use two cores, whatever this machine has
    try:
        for method, params in (("task_arithmetic", {"scale": 0.6}), ("dare_linear", {"p": 0.3})):
            recipe = _recipe(zoo_dir, method, params)
            two, stats = _run_jobs(recipe, tmp_path / f"{method}-2", block_elements=5)
            one, _ = _run_jobs(recipe, tmp_path / f"{method}-1", block_elements=5, parallel_blocks=False)
            whole, _ = _run_jobs(recipe, tmp_path / f"{method}-w", stream=False)
            assert two == one == whole, method
            assert stats["blocks"] > 10 * stats["streamed_tensors"] > 0
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3, "scale": 0.8}),
                                           ("dare_ties", {"p": 0.2, "density": 0.5}),
                                           ("breadcrumbs", {"density": 0.8, "gamma": 0.05})])
def test_whole_tensor_path_reads_in_blocks_with_the_bytes_of_whole_reads(zoo_dir: Path, tmp_path: Path,
                                                                         tiny_blocks: int, method: str,
                                                                         params: dict) -> None:
    """Whole-tensor methods get θ₀ and τᵢ converted block of rows by block into whole float32 tensors: the same
    values as converting the whole stored tensors at once (the reference reads them with safetensors)."""
    recipe = _recipe(zoo_dir, method, params)
    _merge(recipe, tmp_path / "out")
    got = load_state_dict(tmp_path / "out")
    want = _whole_reference(zoo_dir, recipe)
    assert len(want) > 20
    for name, w in want.items():
        assert torch.equal(_bits(got[name]), _bits(w)), f"{method}: {name}"


def test_whole_tensor_methods_do_not_stream(zoo_dir: Path, tmp_path: Path) -> None:
    recipe = _recipe(zoo_dir, "ties", {"density": 0.5}, preset="qwen2_vl")
    _, stats = _run_jobs(recipe, tmp_path / "t", block_elements=5)
    kept = sum(1 for t in plan_merge(recipe).tensors if t.action == "keep")
    assert stats["streamed_tensors"] == kept  # kept tensors stream; TIES needs whole tensors


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])  # streamed; whole tensor read in blocks
def test_non_finite_values_in_two_blocks_are_counted_over_the_whole_tensor(zoo_dir: Path, tmp_path: Path,
                                                                           tiny_blocks: int, method: str) -> None:
    bad = tmp_path / "nan"
    bad.mkdir()
    for f in (zoo_dir / "qwen_e1").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    target = "model.layers.1.self_attn.o_proj.weight"
    shard = bad / index["weight_map"][target]
    tensors = load_file(shard)
    tensors[target][3, 5] = float("nan")
    tensors[target][40, 1] = float("inf")  # another block
    save_file(tensors, shard, metadata={"format": "pt"})
    recipe = parse_recipe({"base": str(zoo_dir / "qwen_base"),
                           "experts": {"e0": str(zoo_dir / "qwen_e0"), "nanny": str(bad)},
                           "method": method, "shard_size": "60KB"})
    with pytest.raises(NonFiniteError, match=rf"Tensor '{target}' of expert 'nanny' \(.*nan\) holds 2 non-finite "
                                             r"value\(s\) \(NaN/Inf\)"):
        _merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape", [(1000003,), (37, 129), ()])
def test_rewritten_element_wise_methods_keep_the_bits_of_their_previous_formulas(shape) -> None:
    """task_arithmetic / weight_average / linear now compute λ·acc + θ₀ (and acc + θ₀·c) in place and memoise
    acc; the previous engine computed θ₀ + λ·acc (θ₀·c + acc). Addition and multiplication commute bit for bit."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g) * 0.02
    deltas = [torch.randn(shape, generator=g) * 1e-3 for _ in range(3)]
    if shape:  # signed zeros: 0 + w·(−0) is +0, and −0 + (+0) is +0 again
        for d in deltas:
            d.view(-1)[:3] = -0.0
        deltas[0].view(-1)[3:6] = -0.0
        base.view(-1)[:4] = -0.0
    w = [0.7, 1.3, 0.4]
    ctx = MergeContext(tensor_name="t", memo={})

    def acc_of(coeffs):
        acc = torch.zeros_like(base)
        for c, d in zip(coeffs, deltas):
            acc.add_(d, alpha=c)
        return acc

    fn = {m: get_method(m).fn for m in ("task_arithmetic", "weight_average", "linear")}
    for scale in (0.3, 0.5, 1.0, 1 / 3):
        got = fn["task_arithmetic"](base, deltas, ctx=ctx, weights=w, scale=scale)
        assert torch.equal(_bits(got), _bits(base + scale * acc_of(w)))
        unit = [1.0, 1.0, 1.0]  # w₀ = 1: the sum starts at τ₀ + 0.0 (no product)
        got = fn["task_arithmetic"](base, deltas, ctx=MergeContext(tensor_name="t"), weights=unit, scale=scale)
        assert torch.equal(_bits(got), _bits(base + scale * acc_of(unit)))
        got = fn["weight_average"](base, deltas, ctx=ctx, weights=w, scale=scale)
        assert torch.equal(_bits(got), _bits(base + scale * acc_of([x / sum(w) for x in w])))
    got = fn["linear"](base, deltas, ctx=ctx, weights=w)
    assert torch.equal(_bits(got), _bits(base + acc_of([x / sum(w) for x in w])))
    total = sum(w) + 0.5
    got = fn["linear"](base, deltas, ctx=ctx, weights=w, include_base=True, base_weight=0.5)
    assert torch.equal(_bits(got), _bits(base * (total / total) + acc_of([x / total for x in w])))
    got = fn["linear"](base, deltas, ctx=ctx, weights=w, normalize=False, include_base=True, base_weight=0.5)
    assert torch.equal(_bits(got), _bits(base * total + acc_of(w)))


def test_plan_estimates_a_block_for_streamed_tensors_and_the_tensor_otherwise(zoo_dir: Path,
                                                                             tiny_blocks: int) -> None:
    from omnimerge.engine.plan import _task_cost
    from omnimerge.engine.row_stream import block_peak_bytes

    big = {"shard_size": "5GB"}
    ta = plan_merge(_recipe(zoo_dir, "task_arithmetic", {}, **big))
    ties = plan_merge(_recipe(zoo_dir, "ties", {}, **big))
    lora = plan_merge(_recipe(zoo_dir, "task_arithmetic", {}, experts=("qwen_e0", "qwen_lora"), weights=(1, 1), **big))
    whole = max(_task_cost(t, 3)[0] for t in ta.tensors)
    assert ties.peak_bytes == whole  # TIES holds whole tensors
    assert ta.peak_bytes == min(whole, block_peak_bytes(3)) < whole
    # A tensor the LoRA expert targets is merged whole (B·A), so the plan counts it whole.
    targeted = [t for t in lora.tensors if t.name in lora.experts[1].lora.targets]
    assert lora.peak_bytes >= max(_task_cost(t, 2)[0] for t in targeted) > block_peak_bytes(2)


def test_a_non_finite_base_is_named_before_any_expert(zoo_dir: Path, tmp_path: Path, tiny_blocks: int) -> None:
    bad = tmp_path / "base"
    bad.mkdir()
    for f in (zoo_dir / "qwen_base").iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    target = "model.layers.0.mlp.up_proj.weight"
    shard = bad / index["weight_map"][target]
    tensors = load_file(shard)
    tensors[target][7, 3] = float("-inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    recipe = parse_recipe({"base": str(bad), "experts": {"e0": str(zoo_dir / "qwen_e0")},
                           "method": "weight_average", "shard_size": "60KB"})
    with pytest.raises(NonFiniteError, match=rf"Tensor '{target}' of base \({bad}\) holds 1 non-finite value"):
        _merge(recipe, tmp_path / "out")
