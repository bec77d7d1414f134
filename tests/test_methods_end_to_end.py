"""Every registered method merges the tiny Qwen2-VL experts through `omnimerge merge`; the result loads and runs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from omnimerge.algorithms import method_names
from omnimerge.cluster.cli import main
from tiny_models import load_state_dict

# Parameters that keep the optimising methods quick on CPU; everything else runs at its defaults.
FAST = {"wudi": {"steps": 5, "lr": 1e-3}, "optmerge": {"steps": 5}}
TWO_EXPERTS = {"slerp"}


@pytest.fixture(scope="module")
def model_inputs():
    return torch.tensor([[3, 4, 5, 6, 7, 8]])


@pytest.mark.parametrize("method", method_names())
def test_method_through_cli_loads_and_runs(method, zoo_dir, tmp_path, model_inputs):
    from transformers import AutoModelForImageTextToText

    experts = {"e0": str(zoo_dir / "qwen_e0"), "e1": str(zoo_dir / "qwen_e1")}
    if method not in TWO_EXPERTS:
        experts["lora"] = str(zoo_dir / "qwen_lora")  # a LoRA expert next to full ones
    recipe = {"base": str(zoo_dir / "qwen_base"), "experts": experts, "method": method,
              "parameters": FAST.get(method, {}), "preset": "qwen2_vl", "seed": 1, "shard_size": "100KB"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["merge", str(path), "-o", str(out), "--executor", "local", "--no-progress"]) == 0

    manifest = json.loads((out / "omnimerge_manifest.json").read_text())
    assert manifest["tensors"].get(f"merge:{method}") == 14  # 2 layers × 7 LLM linear weights
    base, got = load_state_dict(zoo_dir / "qwen_base"), load_state_dict(out)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(got[name], base[name])  # the merge changed an LLM weight
    assert torch.equal(got["visual.merger.mlp.0.weight"], base["visual.merger.mlp.0.weight"])  # preset kept it

    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=model_inputs).logits
    assert logits.shape[:2] == (1, 6) and torch.isfinite(logits).all()
