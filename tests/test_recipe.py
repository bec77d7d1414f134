"""Recipe parsing and validation: every problem at once, presets as data, mergekit configs."""

from __future__ import annotations

import pytest
import yaml

from omnimerge.engine.errors import RecipeError
from omnimerge.engine.recipe import load_preset, load_recipe, parse_recipe, parse_size


def _doc(**over):
    doc = {"base": "/models/base", "experts": {"a": "/models/a", "b": {"source": "/models/b", "weight": 0.5}},
           "method": "task_arithmetic", "parameters": {"scale": 0.7}}
    doc.update(over)
    return doc


def test_valid_recipe_fields():
    r = parse_recipe(_doc(rules=[{"match": "*.bias", "action": "keep"},
                                 {"regex": r"mlp\.down_proj", "method": "weight_average"}],
                          preset="qwen2_vl", dtype="bf16", shard_size="2GB", seed=3))
    assert [e.name for e in r.experts] == ["a", "b"]
    assert r.weights == [1.0, 0.5]
    assert r.dtype == "BF16" and r.shard_size == 2 * 10**9 and r.seed == 3
    # Recipe rules come first, then the preset's.
    assert [x.origin for x in r.rules[:2]] == ["recipe", "recipe"]
    assert all(x.origin == "preset:qwen2_vl" for x in r.rules[2:])
    # First match wins: a bias matches the recipe's keep before the preset.
    assert r.rule_for("model.layers.0.self_attn.q_proj.bias", 1).action == "keep"
    rule = r.rule_for("model.layers.1.mlp.down_proj.weight", 2)
    assert r.method_of(rule) == ("weight_average", {})
    # Globs cross dots; a name no rule matches is merged with the default method (no preset here).
    r2 = parse_recipe(_doc(rules=[{"match": "model.*.weight", "action": "drop"}]))
    assert r2.rule_for("model.layers.0.mlp.up_proj.weight", 2).action == "drop"
    assert r2.rule_for("lm_head.weight", 2).origin == "default"
    assert r2.method_of(r2.rule_for("lm_head.weight", 2)) == ("task_arithmetic", {"scale": 0.7})


def test_every_problem_reported_at_once():
    doc = _doc(method="task_arithmetc", dtype="int4", shard_size="5 parsecs", seed=-1, colour="red",
               rules=[{"match": "*", "action": "explode"}, {"regex": "([", "action": "keep"},
                      {"match": "*", "method": "weight_average", "parameters": {"scael": 1, "scale": -2}}])
    with pytest.raises(RecipeError) as info:
        parse_recipe(doc)
    problems = info.value.problems
    text = "\n".join(problems)
    assert "unknown top-level key 'colour'" in text
    assert "Unknown merge method 'task_arithmetc'. Did you mean 'task_arithmetic'?" in text
    assert "dtype 'int4' is not supported for output" in text
    assert "shard_size: expected a size like '5GB' or '512MiB', got '5 parsecs'" in text
    assert "seed must be a non-negative integer, got -1." in text
    assert "rule 1: action must be one of merge, keep, drop; got 'explode'." in text
    assert "rule 2: regex '([' does not compile" in text
    assert "rule 3: method 'weight_average' has no parameter 'scael'. Did you mean 'scale'?" in text
    assert "rule 3: method 'weight_average' parameter 'scale' = -2: must lie in [0, inf]" in text
    assert len(problems) == 9
    assert str(info.value).startswith("Recipe has 9 problems:")


def test_missing_required_keys():
    with pytest.raises(RecipeError) as info:
        parse_recipe({"experts": {}})
    text = str(info.value)
    assert "'base' is missing" in text and "'experts' is missing or empty" in text and "'method' is missing" in text


def test_trust_remote_code_refused_and_bad_expert():
    with pytest.raises(RecipeError) as info:
        parse_recipe(_doc(trust_remote_code=True, experts={"a": {"path": "/x"}, "b": {"source": "/y", "weight": "hi"}}))
    text = str(info.value)
    assert "never runs model code" in text
    assert "expert 'a': unknown key 'path'." in text and "expert 'a': 'source' is missing" in text
    assert "expert 'b': weight must be a number, got 'hi'." in text


def test_relative_sources_resolve_against_recipe_folder(tmp_path):
    (tmp_path / "experts" / "a").mkdir(parents=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"base": "Qwen/Qwen2-VL-7B", "experts": {"a": "experts/a", "b": "./b"},
                                    "method": "weight_average"}))
    r = load_recipe(path)
    assert r.base.source == "Qwen/Qwen2-VL-7B"  # a hub id stays as written
    assert r.experts[0].source.source == str((tmp_path / "experts" / "a").resolve())
    assert r.experts[1].source.source == str((tmp_path / "b").resolve())


def test_load_recipe_errors_name_the_file(tmp_path):
    with pytest.raises(RecipeError, match=r"file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(RecipeError, match=r"Recipe '.*bad.yaml' is invalid: not valid YAML"):
        load_recipe(bad)


@pytest.mark.parametrize("size,expected", [("5GB", 5 * 10**9), ("512MiB", 512 * 2**20), (1000, 1000),
                                           ("1.5 GB", 1_500_000_000), ("40KB", 40_000)])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


# Names of the same tensors in checkpoints as saved and in transformers' newer module layout.
QWEN_NAMES = {
    # name: expected action under the qwen2_vl preset
    "model.layers.0.self_attn.q_proj.weight": "merge",
    "model.language_model.layers.0.self_attn.q_proj.weight": "merge",
    "model.layers.27.mlp.down_proj.weight": "merge",
    "model.language_model.layers.3.mlp.gate_proj.weight": "merge",
    "model.layers.0.self_attn.q_proj.bias": "keep",
    "model.layers.0.input_layernorm.weight": "keep",
    "model.language_model.norm.weight": "keep",
    "model.embed_tokens.weight": "keep",
    "model.language_model.embed_tokens.weight": "keep",
    "lm_head.weight": "keep",
    "visual.blocks.0.attn.qkv.weight": "keep",
    "model.visual.blocks.0.mlp.fc1.weight": "keep",
    "visual.merger.mlp.0.weight": "keep",
    "model.visual.merger.mlp.2.weight": "keep",
}
LLAVA_NAMES = {
    "language_model.model.layers.0.self_attn.o_proj.weight": "merge",
    "model.language_model.layers.1.mlp.up_proj.weight": "merge",
    "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight": "keep",
    "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": "keep",
    "multi_modal_projector.linear_1.weight": "keep",
    "model.multi_modal_projector.linear_2.weight": "keep",
    "language_model.lm_head.weight": "keep",
    "lm_head.weight": "keep",
    "model.language_model.embed_tokens.weight": "keep",
}
INTERNVL_NAMES = {
    "language_model.model.layers.0.self_attn.q_proj.weight": ("merge", None),
    "model.language_model.layers.0.mlp.down_proj.weight": ("merge", None),
    "language_model.model.layers.0.attention.wqkv.weight": ("merge", None),
    "mlp1.1.weight": ("merge", None),
    "mlp1.0.weight": ("merge", "weight_average"),  # the projector's LayerNorm: mean of task vectors
    "mlp1.1.bias": ("merge", "weight_average"),
    "model.multi_modal_projector.linear_1.weight": ("merge", None),
    "vision_model.encoder.layers.0.attn.qkv.weight": ("keep", None),
    "model.vision_tower.encoder.layer.0.attention.q_proj.weight": ("keep", None),
    "language_model.model.embed_tokens.weight": ("keep", None),
    "language_model.lm_head.weight": ("keep", None),
    "language_model.model.layers.0.input_layernorm.weight": ("keep", None),
}


@pytest.mark.parametrize("name,action", sorted(QWEN_NAMES.items()))
def test_qwen2_vl_preset_matches_old_and_new_names(name, action):
    r = parse_recipe(_doc(preset="qwen2_vl"))
    ndim = 1 if name.endswith("bias") or "norm" in name else 2
    assert r.rule_for(name, ndim).action == action


@pytest.mark.parametrize("name,action", sorted(LLAVA_NAMES.items()))
def test_llava_preset_matches_old_and_new_names(name, action):
    r = parse_recipe(_doc(preset="llava"))
    assert r.rule_for(name, 2).action == action


@pytest.mark.parametrize("name,expected", sorted(INTERNVL_NAMES.items()))
def test_internvl_preset(name, expected):
    r = parse_recipe(_doc(preset="internvl"))
    ndim = 1 if (name.endswith("bias") or name.startswith("mlp1.0") or "norm" in name) else 2
    rule = r.rule_for(name, ndim)
    assert (rule.action, rule.method) == expected


def test_unknown_preset_suggests():
    with pytest.raises(RecipeError, match=r"unknown preset 'qwen2vl'. Did you mean 'qwen2_vl'\?"):
        parse_recipe(_doc(preset="qwen2vl"))
    rules, doc = load_preset("llava")
    assert doc["name"] == "llava" and rules[-1].pattern == "."


# ---- mergekit configs ----------------------------------------------------------------------------------

def test_mergekit_linear_includes_base_with_its_weight():
    r = parse_recipe({"merge_method": "linear", "base_model": "/m/base",
                      "models": [{"model": "/m/base", "parameters": {"weight": 0.2}},
                                 {"model": "/m/x", "parameters": {"weight": 0.3}},
                                 {"model": "/m/y", "parameters": {"weight": 0.5}}],
                      "dtype": "bfloat16"})
    assert r.method == "linear"
    assert r.params == {"include_base": True, "base_weight": 0.2}
    assert [(e.name, e.weight) for e in r.experts] == [("x", 0.3), ("y", 0.5)]
    assert r.dtype == "BF16"


def test_mergekit_unsupported_keys_are_errors():
    with pytest.raises(RecipeError) as info:
        parse_recipe({"merge_method": "linear", "slices": [], "tokenizer_source": "union",
                      "models": [{"model": "/m/x", "parameters": {"weight": [0, 1]}}],
                      "parameters": {"mystery": 1}})
    text = str(info.value)
    assert "mergekit key 'slices': layer slicing/stacking (frankenmerges) is not supported" in text
    assert "mergekit key 'tokenizer_source': tokenizer merging is not supported" in text
    assert "per-layer weight gradients are not supported" in text
    assert "mergekit parameter 'mystery' is not supported for linear" in text
    with pytest.raises(RecipeError, match="merge_method 'passthrough' is not supported"):
        parse_recipe({"merge_method": "passthrough", "models": []})
