"""Cluster planning: the --cluster description, the LPT schedule worked by hand, config-only sources that
match real checkpoint headers, and a Qwen2-VL-72B-shaped merge with 5 experts planned before any download."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from omnimerge.cluster.cli import main
from omnimerge.cluster.cluster_plan import (
    STARTUP_S,
    ClusterSpec,
    dispatch_order,
    job_seconds,
    parse_cluster_spec,
    plan_cluster,
    plan_cluster_from_recipe,
)
from omnimerge.engine.config_index import ConfigTensorIndex, config_tensor_index
from omnimerge.engine.errors import PlanError, SourceNotFoundError
from omnimerge.engine.plan import plan_merge
from omnimerge.engine.recipe import load_recipe, parse_recipe
from omnimerge.engine.safetensors_io import TensorIndex
from omnimerge.engine.sources import SourceSpec, resolve_source

# Qwen2-VL-72B's public architecture numbers (its config.json on the hub, abridged to what shapes depend on).
QWEN2_VL_72B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
    "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "vocab_size": 152064, "hidden_act": "silu", "max_position_embeddings": 32768,
    "max_window_layers": 80, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "use_sliding_window": False, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 8192, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
}


def test_parse_cluster_spec_units_defaults_and_all_problems_at_once() -> None:
    spec = parse_cluster_spec("nodes=8, gpus_per_node=8, gpu_mem=80GB")
    assert spec == ClusterSpec(8, 8, 80 * 10**9, 40.0, 2.0) and spec.workers == 64
    spec = parse_cluster_spec("nodes=2,gpus_per_node=4,gpu_mem=141GiB,gpu_tflops=60,disk_gbps=5.5")
    assert (spec.gpu_mem, spec.gpu_tflops, spec.disk_gbps) == (141 * 2**30, 60.0, 5.5)
    with pytest.raises(PlanError) as info:
        parse_cluster_spec("nodes=2.5,gpu_mem=lots,gpus=8")
    assert str(info.value) == (
        "Cluster description 'nodes=2.5,gpu_mem=lots,gpus=8' has 4 problem(s): 'gpus=8' is not one of nodes=…, "
        "gpus_per_node=…, gpu_mem=…, gpu_tflops=…, disk_gbps=…; gpus_per_node= is required; nodes='2.5' is not "
        "a positive whole number; gpu_mem='lots' is not a size such as 80GB. Example: "
        "nodes=8,gpus_per_node=8,gpu_mem=80GB,gpu_tflops=40,disk_gbps=2")


def _fake_plan(seconds: list[float], spec: ClusterSpec, peak: int = 10**9) -> SimpleNamespace:
    """Jobs that cost exactly ``seconds`` on ``spec`` (pure compute: flops = s · TFLOP/s)."""
    jobs = [SimpleNamespace(index=i, filename=f"s{i}", read_bytes=0, write_bytes=0, peak_bytes=peak,
                            flops=s * spec.gpu_tflops * 1e12) for i, s in enumerate(seconds)]
    src = SimpleNamespace(label="base", kind="model", spec=SimpleNamespace(source="b"), index=None)
    return SimpleNamespace(jobs=jobs, prepasses=[], tensors=[], experts=[], base=src, recipe=SimpleNamespace(
        path=None, name="fake"), read_bytes=0, write_bytes=0)


def test_lpt_schedule_worked_by_hand() -> None:
    # Jobs s0..s4 take 3,5,3,4,3 s; 2 workers. LPT (ties in plan order): s1=5→A, s3=4→B, s0=3→B (7),
    # s2=3→A (8), s4=3→B (10): makespan 10, where the optimum is 9 (5+4 | 3+3+3) — LPT's classic worst case,
    # within its 4/3 bound.
    spec = ClusterSpec(nodes=1, gpus_per_node=2, gpu_mem=80 * 10**9)
    schedule = plan_cluster(_fake_plan([3, 5, 3, 4, 3], spec), spec)
    assert [w.jobs for w in schedule.workers] == [["s1", "s2"], ["s3", "s0", "s4"]]
    assert [round(w.seconds, 9) for w in schedule.workers] == [8, 10]
    assert schedule.makespan_s == pytest.approx(10) and schedule.lower_bound_s == pytest.approx(9)
    assert schedule.wall_s == pytest.approx(10 + STARTUP_S)
    # Ties spread over nodes first (GPU-major), as Ray's SPREAD placement does.
    spec = ClusterSpec(nodes=3, gpus_per_node=2, gpu_mem=80 * 10**9)
    schedule = plan_cluster(_fake_plan([1, 1, 1], spec), spec)
    assert [(w.node, w.gpu) for w in schedule.workers if w.jobs] == [(0, 0), (1, 0), (2, 0)]


def test_jobs_too_big_for_a_gpu_are_flagged() -> None:
    spec = ClusterSpec(nodes=1, gpus_per_node=1, gpu_mem=4 * 10**9)
    schedule = plan_cluster(_fake_plan([1, 1], spec, peak=5 * 10**9), spec)
    assert [name for name, _ in schedule.too_big] == ["s0", "s1"]


def test_schedule_of_a_real_plan_accounts_for_every_job_and_byte(zoo_dir: Path) -> None:
    recipe = parse_recipe({"base": str(zoo_dir / "qwen_base"), "method": "optmerge", "parameters": {"steps": 10},
                           "experts": {e: str(zoo_dir / e) for e in ("qwen_e0", "qwen_e1")},
                           "shard_size": "60KB"})
    plan = plan_merge(recipe)
    spec = parse_cluster_spec("nodes=2,gpus_per_node=2,gpu_mem=1GB,gpu_tflops=0.001,disk_gbps=0.01")
    schedule = plan_cluster(plan, spec)
    assigned = sorted(j for w in schedule.workers for j in w.jobs)
    assert assigned == sorted(j.filename for j in plan.jobs)
    assert sum(schedule.read_by_node) == plan.read_bytes
    assert sum(w.flops for w in schedule.workers) == pytest.approx(plan.flops)
    assert sum(schedule.flops_by_method.values()) == pytest.approx(plan.flops)
    assert set(schedule.flops_by_method) >= {"optmerge", "weight_average"}  # 1-D tensors fall back
    assert schedule.lower_bound_s <= schedule.makespan_s <= 2 * schedule.lower_bound_s
    order = dispatch_order(plan.jobs, spec)
    assert [job_seconds(j, spec) for j in order] == sorted((job_seconds(j, spec) for j in plan.jobs), reverse=True)


@pytest.mark.parametrize("base", ["qwen_base", "llava_base"])
def test_config_only_index_matches_real_checkpoint_headers(zoo_dir: Path, tmp_path: Path, base: str) -> None:
    (tmp_path / "cfg").mkdir()
    shutil.copyfile(zoo_dir / base / "config.json", tmp_path / "cfg" / "config.json")
    real = TensorIndex.from_dir(zoo_dir / base)
    derived = config_tensor_index(tmp_path / "cfg")
    assert isinstance(derived, ConfigTensorIndex) and derived.config_only
    assert sorted(derived.names()) == sorted(real.names())
    assert {n: (derived[n].shape, derived[n].dtype) for n in real.names()} == \
        {n: (real[n].shape, real[n].dtype) for n in real.names()}
    assert derived.total_bytes == real.total_bytes
    # Planning resolves it; merging refuses it with the usual "no weights" error.
    src = resolve_source(SourceSpec(str(tmp_path / "cfg")), label="base", plan_only=True)
    assert src.index.config_only
    with pytest.raises(SourceNotFoundError, match="holds no weights"):
        resolve_source(SourceSpec(str(tmp_path / "cfg")), label="base")


@pytest.fixture
def qwen72b_recipe(tmp_path: Path) -> Path:
    for name in ("base", "chart", "ocr", "math", "ground", "vqa"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(QWEN2_VL_72B))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "qwen2-vl-72b-5-experts", "base": str(tmp_path / "base"), "method": "ties", "preset": "qwen2_vl",
        "experts": {n: str(tmp_path / n) for n in ("chart", "ocr", "math", "ground", "vqa")},
        "rules": [{"match": "model.layers.*.self_attn.o_proj.weight", "action": "merge", "method": "optmerge",
                   "parameters": {"steps": 50}}],
        "dtype": "bfloat16"}))
    return recipe


def test_qwen2_vl_72b_with_5_experts_planned_from_configs_alone(qwen72b_recipe: Path, capsys) -> None:
    recipe = load_recipe(qwen72b_recipe)
    doc = json.loads(plan_cluster_from_recipe(recipe, "nodes=8,gpus_per_node=8,gpu_mem=80GB", as_json=True))
    # 80 layers × 12 tensors + embed, norm, lm_head; vision: 32 blocks × 12 + patch embed + 6 merger tensors.
    assert doc["tensors"] == 80 * 12 + 3 + 32 * 12 + 1 + 6 == 1354
    params = doc["write_bytes"] / 2  # bf16 output
    assert 73.0e9 < params < 73.8e9  # Qwen2-VL-72B has 73.4 B parameters
    # Merged tensors are read from base + 5 experts; the preset keeps the vision tower at base (read once).
    assert 5 * doc["write_bytes"] < doc["read_bytes"] < 6 * doc["write_bytes"]
    assert doc["config_only"] == ["base"] + [e.name for e in recipe.experts] and len(recipe.experts) == 5
    assert len(doc["workers"]) == 64 and sum(len(w["jobs"]) for w in doc["workers"]) == doc["jobs"]
    assert not doc["too_big"] and max(w["peak_bytes"] for w in doc["workers"]) < 80e9
    assert sum(doc["read_by_node"]) == doc["read_bytes"]
    assert set(doc["flops_by_method"]) == {"optmerge", "ties", "keep"}
    assert doc["wall_s"] > doc["makespan_s"] >= doc["lower_bound_s"] > 0

    # The command line prints the same schedule as text.
    assert main(["plan", str(qwen72b_recipe), "--cluster", "nodes=8,gpus_per_node=8,gpu_mem=80GB"]) == 0
    text = capsys.readouterr().out
    labels = ", ".join(["base"] + [e.name for e in recipe.experts])
    assert f"planned from config.json alone (no weights yet): {labels}" in text
    assert "1354 tensors in" in text and "node7/gpu7" in text and "Estimated wall time:" in text
    assert "Memory: every job fits one GPU" in text
