"""PEFT LoRA adapters mapped onto base tensors (engine/lora.py), checked against peft's own merge."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build_tiny_llava, build_tiny_qwen2vl, load_state_dict, make_lora_adapter  # noqa: E402

from omnimerge.algorithms.base import LowRank  # noqa: E402
from omnimerge.engine.errors import SourceError, SourceNotFoundError, TensorMismatchError  # noqa: E402
from omnimerge.engine.lora import LoraAdapter  # noqa: E402
from omnimerge.engine.safetensors_io import TensorIndex, TensorReader  # noqa: E402


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    return {"qwen": build_tiny_qwen2vl(root / "qwen"), "llava": build_tiny_llava(root / "llava")}


def _peft_merged(base_dir: Path, adapter_dir: Path, out_dir: Path) -> dict[str, torch.Tensor]:
    """The base with the adapter merged by peft's merge_and_unload, saved and read back by checkpoint name."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    return load_state_dict(out_dir)


def _check_against_peft(base_dir: Path, adapter_dir: Path, tmp_path: Path) -> LoraAdapter:
    base_index = TensorIndex.from_dir(base_dir)
    adapter = LoraAdapter.from_dir(adapter_dir, base_index)
    base = load_state_dict(base_dir)
    merged = _peft_merged(base_dir, adapter_dir, tmp_path / "merged")
    assert set(merged) == set(base)
    changed = set(adapter.names())
    with TensorReader(adapter.index) as r:
        for name in base:
            if name in adapter.targets:
                d = adapter.delta(name, r)
                assert isinstance(d, LowRank) and d.A.dtype == d.B.dtype == torch.float32
                torch.testing.assert_close(d.dense(), merged[name] - base[name], rtol=0, atol=2e-6)
                assert d.dense().abs().max() > 1e-3  # the adapter really changes this tensor
            elif name in adapter.replacements:
                assert torch.equal(r.read(adapter.replacements[name]), merged[name])
            else:  # everything else is untouched by peft's merge
                assert torch.equal(merged[name], base[name]), name
    assert changed == set(adapter.targets) | set(adapter.replacements)
    return adapter


@pytest.mark.parametrize("arch", ["qwen", "llava"])
def test_delta_equals_merge_and_unload(zoo: dict[str, Path], tmp_path: Path, arch: str) -> None:
    adapter_dir = make_lora_adapter(
        zoo[arch], tmp_path / "adapter", seed=3, target_modules=("q_proj", "v_proj", "o_proj", "fc1"),
        modules_to_save=["lm_head"],
    )
    adapter = _check_against_peft(zoo[arch], adapter_dir, tmp_path)
    head = "lm_head.weight" if arch == "qwen" else "language_model.lm_head.weight"
    assert list(adapter.replacements) == [head]
    if arch == "qwen":
        assert "model.layers.1.self_attn.o_proj.weight" in adapter.targets
        assert "visual.blocks.0.mlp.fc1.weight" in adapter.targets
        assert len(adapter.targets) == 2 * 3 + 2  # 2 text layers × q,v,o + 2 vision blocks × fc1
    else:
        assert "language_model.model.layers.0.self_attn.q_proj.weight" in adapter.targets
        assert "vision_tower.encoder.layers.1.self_attn.v_proj.weight" in adapter.targets
        assert len(adapter.targets) == 2 * 3 + 2 * 3  # 2 text layers × q,v,o + 2 CLIP layers × q,v,fc1
    t = next(iter(adapter.targets.values()))
    assert (t.rank, t.alpha, t.scale) == (4, 8.0, 2.0)  # s = α / r = 8 / 4


def test_rslora_scale(zoo: dict[str, Path], tmp_path: Path) -> None:
    adapter_dir = make_lora_adapter(zoo["qwen"], tmp_path / "rs", seed=4, r=4, alpha=8, use_rslora=True)
    adapter = _check_against_peft(zoo["qwen"], adapter_dir, tmp_path)
    assert {t.scale for t in adapter.targets.values()} == {8 / math.sqrt(4)}  # α / √r = 4.0


def test_rank_and_alpha_patterns(zoo: dict[str, Path], tmp_path: Path) -> None:
    adapter_dir = make_lora_adapter(
        zoo["qwen"], tmp_path / "pat", seed=5, r=4, alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 2}
    )
    adapter = _check_against_peft(zoo["qwen"], adapter_dir, tmp_path)
    q = adapter.targets["model.layers.0.self_attn.q_proj.weight"]
    v = adapter.targets["model.layers.1.self_attn.v_proj.weight"]
    assert (q.rank, q.alpha, q.scale) == (4, 2.0, 0.5)  # α from alpha_pattern: 2 / 4
    assert (v.rank, v.alpha, v.scale) == (2, 8.0, 4.0)  # r from rank_pattern: 8 / 2


def _rewrite_adapter(src: Path, dst: Path, rename=lambda k: k, edit=None, config=None) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    tensors = {rename(k): v for k, v in tensors.items()}
    if edit:
        edit(tensors)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    if config:
        doc = json.loads((dst / "adapter_config.json").read_text())
        doc.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(doc))
    return dst


@pytest.fixture(scope="module")
def qwen_adapter(zoo, tmp_path_factory) -> Path:
    return make_lora_adapter(zoo["qwen"], tmp_path_factory.mktemp("qa") / "adapter", seed=7)


@pytest.mark.parametrize(
    "rename",
    [
        lambda k: k.replace(".weight", ".default.weight") if ".lora_" in k else k,  # named adapter
        lambda k: k.removeprefix("base_model.model."),  # no PEFT prefix
    ],
    ids=["default-adapter-name", "no-prefix"],
)
def test_peft_name_variants_map_to_the_same_targets(zoo, qwen_adapter, tmp_path, rename) -> None:
    base_index = TensorIndex.from_dir(zoo["qwen"])
    ref = LoraAdapter.from_dir(qwen_adapter, base_index)
    variant = LoraAdapter.from_dir(_rewrite_adapter(qwen_adapter, tmp_path / "v", rename), base_index)
    assert variant.names() == ref.names()
    with TensorReader(ref.index) as r0, TensorReader(variant.index) as r1:
        for name in ref.targets:
            assert torch.equal(ref.delta(name, r0).dense(), variant.delta(name, r1).dense())


def test_shape_mismatch_with_base(zoo, qwen_adapter, tmp_path) -> None:
    key = "base_model.model.model.language_model.layers.0.self_attn.v_proj.lora_B.weight"

    def edit(t):
        t[key] = torch.zeros(48, 4)

    bad = _rewrite_adapter(qwen_adapter, tmp_path / "bad", edit=edit)
    with pytest.raises(TensorMismatchError) as e:
        LoraAdapter.from_dir(bad, TensorIndex.from_dir(zoo["qwen"]))
    assert str(e.value) == (
        f"LoRA adapter '{bad / 'adapter_model.safetensors'}': module 'model.language_model.layers.0.self_attn.v_proj' "
        "has B [48, 4] and A [4, 64], but base tensor 'model.layers.0.self_attn.v_proj.weight' is [32, 64] (B must "
        "be m×r and A r×n for a base of m×n). The adapter was trained on a different base; use the base it was "
        "trained on."
    )


def test_rank_in_config_disagrees_with_weights(zoo, qwen_adapter, tmp_path) -> None:
    bad = _rewrite_adapter(qwen_adapter, tmp_path / "bad", config={"r": 8})
    with pytest.raises(TensorMismatchError, match=r"has rank 4 in its weights but 8 in adapter_config.json"):
        LoraAdapter.from_dir(bad, TensorIndex.from_dir(zoo["qwen"]))


def test_adapter_for_another_base(zoo, tmp_path) -> None:
    # A LLaVA adapter on Qwen2-VL: the text layers happen to line up (same names after renaming, same
    # shapes), the CLIP vision tower does not exist in Qwen2-VL.
    llava_adapter = make_lora_adapter(zoo["llava"], tmp_path / "llava_adapter", seed=2)
    with pytest.raises(SourceError) as e:
        LoraAdapter.from_dir(llava_adapter, TensorIndex.from_dir(zoo["qwen"]))
    msg = str(e.value)
    assert "targets 'model.vision_tower.encoder.layers.0.self_attn.q_proj.weight', which base" in msg
    assert "(tried: model.vision_tower.encoder.layers.0.self_attn.q_proj.weight, " \
        "vision_tower.encoder.layers.0.self_attn.q_proj.weight)" in msg
    assert "Check that the adapter was trained on this base" in msg


def test_missing_factor(zoo, qwen_adapter, tmp_path) -> None:
    key = "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_B.weight"
    bad = _rewrite_adapter(qwen_adapter, tmp_path / "bad", edit=lambda t: t.pop(key))
    with pytest.raises(SourceError, match=r"but no lora_B for module 'model.language_model.layers.1.self_attn.q_proj'"):
        LoraAdapter.from_dir(bad, TensorIndex.from_dir(zoo["qwen"]))


def test_dora_is_unsupported(zoo, tmp_path) -> None:
    dora = make_lora_adapter(zoo["qwen"], tmp_path / "dora", seed=1, use_dora=True)
    with pytest.raises(SourceError) as e:
        LoraAdapter.from_dir(dora, TensorIndex.from_dir(zoo["qwen"]))
    assert str(e.value) == (
        f"LoRA adapter '{dora / 'adapter_config.json'}' is unsupported: use_dora is true; DoRA adapters are not "
        "supported. Merge it into a full checkpoint with peft's merge_and_unload() and use that as an expert."
    )
    # Even when the config hides it, the magnitude vectors give DoRA away.
    hidden = _rewrite_adapter(dora, tmp_path / "hidden", config={"use_dora": False})
    with pytest.raises(SourceError, match=r"uses DoRA \(weight-decomposed LoRA\) \(tensor '.*lora_magnitude_vector"):
        LoraAdapter.from_dir(hidden, TensorIndex.from_dir(zoo["qwen"]))


def test_fan_in_fan_out_is_unsupported(zoo, qwen_adapter, tmp_path) -> None:
    bad = _rewrite_adapter(qwen_adapter, tmp_path / "fifo", config={"fan_in_fan_out": True})
    with pytest.raises(SourceError, match=r"is unsupported: fan_in_fan_out is true \(Conv1D/GPT-2 style layers\)"):
        LoraAdapter.from_dir(bad, TensorIndex.from_dir(zoo["qwen"]))


def test_embedding_lora_is_unsupported(zoo, tmp_path) -> None:
    emb = make_lora_adapter(zoo["qwen"], tmp_path / "emb", seed=1, target_modules=("embed_tokens",))
    with pytest.raises(SourceError, match=r"uses LoRA on embedding layers \(tensor '.*embed_tokens.lora_embedding_"):
        LoraAdapter.from_dir(emb, TensorIndex.from_dir(zoo["qwen"]))


def test_conv_lora_is_unsupported(zoo, tmp_path) -> None:
    conv = make_lora_adapter(zoo["qwen"], tmp_path / "conv", seed=1, target_modules=("patch_embed.proj",))
    with pytest.raises(SourceError, match=r"module 'model.visual.patch_embed.proj' has factors of shapes .* not conv LoRA"):
        LoraAdapter.from_dir(conv, TensorIndex.from_dir(zoo["qwen"]))


def test_not_an_adapter(tmp_path, zoo) -> None:
    with pytest.raises(SourceNotFoundError, match=r"has no adapter_config.json; it is not a PEFT adapter directory"):
        LoraAdapter.from_dir(tmp_path, TensorIndex.from_dir(zoo["qwen"]))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    with pytest.raises(SourceNotFoundError, match=r"has adapter_config.json but no adapter_model.safetensors"):
        LoraAdapter.from_dir(tmp_path, TensorIndex.from_dir(zoo["qwen"]))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(SourceError, match=r"peft_type is 'IA3'; only LORA adapters are supported"):
        LoraAdapter.from_dir(tmp_path, TensorIndex.from_dir(zoo["qwen"]))


def test_delta_of_unknown_tensor(zoo, qwen_adapter) -> None:
    adapter = LoraAdapter.from_dir(qwen_adapter, TensorIndex.from_dir(zoo["qwen"]))
    with TensorReader(adapter.index) as r, pytest.raises(KeyError, match="no low-rank factors for base tensor 'x'"):
        adapter.delta("x", r)
