"""End-to-end merges on tiny real architectures with the local executor (no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from omnimerge.engine.errors import NonFiniteError, OutputExistsError, ResumeError, TensorMismatchError
from omnimerge.engine.execute import LocalExecutor
from omnimerge.engine.merge import run_merge
from omnimerge.engine.plan import plan_merge
from omnimerge.engine.recipe import parse_recipe
from tiny_models import load_state_dict


def _recipe(zoo: Path, base: str, names: list[str], **over):
    doc = {"base": str(zoo / base), "experts": {e: str(zoo / e) for e in names}, "method": "task_arithmetic",
           "shard_size": "60KB"}
    doc.update(over)
    return parse_recipe(doc)


def _merge(recipe, out, **kw):
    return run_merge(recipe, out, executor=LocalExecutor(kw.pop("workers", 1)), progress=False, **kw)


def test_keep_everything_reproduces_base_bytes(zoo_dir, tmp_path):
    for base in ("qwen_base", "llava_base"):
        recipe = _recipe(zoo_dir, base, [base.replace("base", "e0")], rules=[{"match": "*", "action": "keep"}])
        out = tmp_path / base
        report = _merge(recipe, out)
        expected, got = load_state_dict(zoo_dir / base), load_state_dict(out)
        assert set(got) == set(expected)
        for name, t in expected.items():
            assert got[name].dtype == t.dtype
            assert got[name].numpy().tobytes() == t.numpy().tobytes(), name
        # Several shards, an index that covers every tensor, and the tagalong files.
        assert len(report.results) > 1
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(expected)
        assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
        manifest = json.loads((out / "omnimerge_manifest.json").read_text())
        assert manifest["tensors"] == {"keep": len(expected)}
        assert not (tmp_path / f"{base}.omnimerge-staging").exists()


def test_task_arithmetic_equals_naive_computation(zoo_dir, tmp_path):
    experts = ["qwen_e0", "qwen_e1", "qwen_e2"]
    doc_experts = {e: {"source": str(zoo_dir / e), "weight": w} for e, w in zip(experts, (1.0, 0.5, 2.0))}
    recipe = _recipe(zoo_dir, "qwen_base", experts, experts=doc_experts, parameters={"scale": 0.3},
                     preset="qwen2_vl")
    out = tmp_path / "ta"
    _merge(recipe, out, workers=2)
    base = load_state_dict(zoo_dir / "qwen_base")
    sds = [load_state_dict(zoo_dir / e) for e in experts]
    got = load_state_dict(out)
    merged = kept = 0
    for name, b in base.items():
        is_linear = ".layers." in name and name.endswith("proj.weight") and "visual" not in name
        if is_linear:
            expected = b + 0.3 * sum(w * (sd[name] - b) for w, sd in zip((1.0, 0.5, 2.0), sds))
            torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6)
            merged += 1
        else:
            assert torch.equal(got[name], b), name  # preset keeps it at base
            kept += 1
    assert merged == 14 and kept > 0  # 2 layers × 7 linear weights


def test_output_dtype_and_forward_pass(zoo_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    for base, experts, preset in (("qwen_base", ["qwen_e0", "qwen_e1"], "qwen2_vl"),
                                  ("llava_base", ["llava_e0", "llava_e1"], "llava")):
        recipe = _recipe(zoo_dir, base, experts, method="weight_average", preset=preset, dtype="bfloat16")
        out = tmp_path / base
        _merge(recipe, out)
        sd = load_state_dict(out)
        assert {t.dtype for t in sd.values()} == {torch.bfloat16}
        assert json.loads((out / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
        model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
        ids = torch.tensor([[3, 4, 5, 6, 7]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert logits.shape == (1, 5, model.config.text_config.vocab_size)
        assert torch.isfinite(logits).all()


def test_lora_expert_equals_merge_and_unload(zoo_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    recipe = _recipe(zoo_dir, "qwen_base", [], experts={"lora": str(zoo_dir / "qwen_lora")})
    out = tmp_path / "lora"
    _merge(recipe, out)
    model = AutoModelForImageTextToText.from_pretrained(zoo_dir / "qwen_base", dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, zoo_dir / "qwen_lora").merge_and_unload()
    expected = {k: v for k, v in merged.state_dict().items()}
    got = load_state_dict(out)
    base = load_state_dict(zoo_dir / "qwen_base")
    changed = 0
    for name, t in got.items():
        # transformers' in-memory names can differ from the saved ones; match by suffix
        key = name if name in expected else next(k for k in expected if k.endswith(name.split("model.", 1)[-1]))
        torch.testing.assert_close(t, expected[key], rtol=1e-5, atol=1e-6)
        changed += not torch.equal(t, base[name])
    assert changed == 6  # q_proj, v_proj, down_proj in 2 layers


def test_mergekit_linear_recipe_matches_its_definition(zoo_dir, tmp_path):
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump({
        "merge_method": "linear", "base_model": str(zoo_dir / "llava_base"), "dtype": "float32",
        "models": [{"model": str(zoo_dir / "llava_base"), "parameters": {"weight": 1.0}},
                   {"model": str(zoo_dir / "llava_e0"), "parameters": {"weight": 2.0}},
                   {"model": str(zoo_dir / "llava_e1"), "parameters": {"weight": 1.0}}]}))
    from omnimerge.engine.recipe import load_recipe

    out = tmp_path / "mk"
    _merge(load_recipe(path), out)
    # mergekit's linear: Σ wᵢ θᵢ / Σ wᵢ over the listed models (normalize defaults to true)
    sds = [load_state_dict(zoo_dir / m) for m in ("llava_base", "llava_e0", "llava_e1")]
    got = load_state_dict(out)
    for name in got:
        expected = (1.0 * sds[0][name] + 2.0 * sds[1][name] + 1.0 * sds[2][name]) / 4.0
        torch.testing.assert_close(got[name], expected, rtol=0, atol=2e-7)


def test_drop_rule_and_coverage(zoo_dir, tmp_path):
    recipe = _recipe(zoo_dir, "qwen_base", ["qwen_e0"], rules=[{"match": "lm_head.weight", "action": "drop"}])
    out = tmp_path / "drop"
    _merge(recipe, out)
    got = load_state_dict(out)
    assert "lm_head.weight" not in got and len(got) == len(load_state_dict(zoo_dir / "qwen_base")) - 1
    assert json.loads((out / "omnimerge_manifest.json").read_text())["dropped"] == ["lm_head.weight"]


def test_existing_output_refused_then_overwritten(zoo_dir, tmp_path):
    recipe = _recipe(zoo_dir, "qwen_base", ["qwen_e0"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="Output directory '.*out' already exists. Choose another -o path, "
                                                "or pass --overwrite"):
        _merge(recipe, out)
    _merge(recipe, out, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "omnimerge_manifest.json").is_file()


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_shape_mismatch_and_missing_tensors_listed(zoo_dir, tmp_path):
    bad = _copy_model(zoo_dir / "qwen_e1", tmp_path / "bad")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    target = "model.layers.0.mlp.down_proj.weight"
    shard = bad / index["weight_map"][target]
    tensors = load_file(shard)
    tensors[target] = torch.zeros(64, 100)
    save_file(tensors, shard, metadata={"format": "pt"})
    dropped = "model.layers.1.mlp.up_proj.weight"
    other = bad / index["weight_map"][dropped]
    tensors = load_file(other)
    del tensors[dropped]
    save_file(tensors, other, metadata={"format": "pt"})
    del index["weight_map"][dropped]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    recipe = parse_recipe({"base": str(zoo_dir / "qwen_base"), "experts": {"bad": str(bad)},
                           "method": "task_arithmetic"})
    with pytest.raises(TensorMismatchError) as info:
        plan_merge(recipe)
    text = str(info.value)
    assert (f"Tensor '{target}' is [64, 100] in expert 'bad' but [64, 128] in base '{zoo_dir / 'qwen_base'}'. "
            "Experts must share the base's shapes; keep this tensor at base with a rule, or drop the expert.") in text
    assert f"expert 'bad' lacks 1 tensor(s) that a rule merges: '{dropped}'. Keep these tensors at base" in text


def test_non_finite_input_named(zoo_dir, tmp_path):
    bad = _copy_model(zoo_dir / "qwen_e1", tmp_path / "nan")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    target = "model.layers.1.self_attn.o_proj.weight"
    shard = bad / index["weight_map"][target]
    tensors = load_file(shard)
    tensors[target][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    recipe = parse_recipe({"base": str(zoo_dir / "qwen_base"), "experts": {"e0": str(zoo_dir / "qwen_e0"),
                                                                          "nanny": str(bad)},
                           "method": "task_arithmetic"})
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=rf"Tensor '{target}' of expert 'nanny' \(.*nan\) holds 1 non-finite"):
        _merge(recipe, out)
    assert not out.exists()  # nothing half-written


def _cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "omnimerge.cluster.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


def test_interrupted_merge_resumes_only_remaining_shards(zoo_dir, tmp_path):
    recipe = {"base": str(zoo_dir / "qwen_base"), "experts": {"a": str(zoo_dir / "qwen_e0"),
                                                              "b": str(zoo_dir / "qwen_e1")},
              "method": "task_arithmetic", "shard_size": "60KB"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    plan = plan_merge(parse_recipe(recipe))
    n_jobs = len(plan.jobs)
    assert n_jobs >= 3
    victim = plan.jobs[2].tensors[0].name  # dies when the third shard starts
    out = tmp_path / "out"
    marker = tmp_path / "killed"
    first = _cli("merge", str(path), "-o", str(out), "--executor", "local", "--no-progress",
                 env={"OMNIMERGE_FAULT": f"{victim}:{marker}"})
    assert first.returncode == 17, first.stderr
    assert marker.exists() and not out.exists()
    staging = tmp_path / "out.omnimerge-staging"
    assert sorted(p.name for p in staging.glob("model-*.safetensors")) == [j.filename for j in plan.jobs[:2]]
    second = _cli("merge", str(path), "-o", str(out), "--executor", "local", "--no-progress")
    assert second.returncode == 0, second.stderr
    manifest = json.loads((out / "omnimerge_manifest.json").read_text())
    resumed = sorted(k for k, v in manifest["shards"].items() if v["resumed"])
    assert resumed == [j.filename for j in plan.jobs[:2]]  # only the remaining shards were recomputed
    # Identical to an undisturbed run.
    clean = tmp_path / "clean"
    _merge(parse_recipe(recipe), clean)
    for job in plan.jobs:
        assert (out / job.filename).read_bytes() == (clean / job.filename).read_bytes()


def test_resume_refused_after_recipe_change(zoo_dir, tmp_path):
    doc = {"base": str(zoo_dir / "qwen_base"), "experts": {"a": str(zoo_dir / "qwen_e0")},
           "method": "task_arithmetic", "shard_size": "60KB"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    victim = plan_merge(parse_recipe(doc)).jobs[1].tensors[0].name
    res = _cli("merge", str(path), "-o", str(tmp_path / "out"), "--executor", "local", "--no-progress",
               env={"OMNIMERGE_FAULT": f"{victim}:{tmp_path / 'k'}"})
    assert res.returncode == 17
    doc["parameters"] = {"scale": 0.5}
    with pytest.raises(ResumeError, match=r"Cannot resume into '.*out.omnimerge-staging': the recipe changed since "
                                          r"that staging was written.*Delete '.*' to start over"):
        _merge(parse_recipe(doc), tmp_path / "out")


def test_hub_source_through_local_cache(zoo_dir, tmp_path):
    from tiny_models import write_hf_cache

    cache = tmp_path / "hf"
    commit = write_hf_cache(cache, "tiny-org/qwen-base", zoo_dir / "qwen_base")
    write_hf_cache(cache, "tiny-org/qwen-e0", zoo_dir / "qwen_e0")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"base": "tiny-org/qwen-base", "experts": {"e0": "tiny-org/qwen-e0"},
                                    "method": "weight_average"}))
    out = tmp_path / "out"
    # huggingface_hub reads its cache location at import: run the real command in a fresh process, offline.
    res = _cli("merge", str(path), "-o", str(out), "--executor", "local", "--no-progress",
               env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "omnimerge_manifest.json").read_text())
    assert manifest["inputs"][0]["revision"] == commit
    b, e = load_state_dict(zoo_dir / "qwen_base"), load_state_dict(zoo_dir / "qwen_e0")
    got = load_state_dict(out)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(got[name], e[name], rtol=0, atol=1e-7)  # mean of one expert = that expert


def test_plan_cli_prints_rules_and_fails_on_problems(zoo_dir, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"base": str(zoo_dir / "qwen_base"), "experts": {"a": str(zoo_dir / "qwen_e0")},
                                    "method": "task_arithmetic", "preset": "qwen2_vl", "shard_size": "60KB"}))
    res = _cli("plan", str(path))
    assert res.returncode == 0, res.stderr
    assert "14 tensors  merge with task_arithmetic" in res.stdout
    assert "Output shards (" in res.stdout and "peak memory per worker" in res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": str(zoo_dir / "qwen_base"), "experts": {"a": str(tmp_path / "nope")},
                                   "method": "tiess"}))
    res = _cli("plan", str(bad))
    assert res.returncode == 1
    assert "Unknown merge method 'tiess'" in res.stderr
