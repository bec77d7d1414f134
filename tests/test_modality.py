"""Modality merging toward an omni model, on tiny real models that share one LLM.

Tiny LLaVA and Video-LLaVA on one tiny LLaMA, and tiny Qwen2-VL and Qwen2-Audio on one tiny Qwen2, all built
from ``transformers`` configs and saved as ``transformers`` 5 saves them (``tiny_modality_models``). Experts move
only their LLM (seeded noise); encoders and connectors differ per model. Expectations are computed here from the
input files, independently of the engine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import load_state_dict, make_expert
from tiny_modality_models import (
    AUDIO_TOKEN_ID,
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    build_llama_llm,
    build_llava_on,
    build_qwen2_llm,
    build_qwen2audio_on,
    build_qwen2vl_on,
    build_video_llava_on,
    make_lora,
)

from omnimerge.engine.errors import NonFiniteError, RecipeError, TensorMismatchError
from omnimerge.engine.modality import assemble_from_bundle, parse_modality_recipe, plan_modality, run_modality_merge
from omnimerge.engine.modality_keymap import load_keymap

LLAVA_LLM = re.compile(r"^language_model\.")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama (shared LLM), llava / vllava on it, and experts llava_x / vllava_x that moved only their LLM."""
    root = tmp_path_factory.mktemp("modality")
    build_llama_llm(root / "llama")
    build_llava_on(root / "llama", root / "llava")
    build_video_llava_on(root / "llama", root / "vllava")
    make_expert(root / "llava", root / "llava_x", seed=5, noise=0.02, only=LLAVA_LLM.pattern)
    make_expert(root / "vllava", root / "vllava_x", seed=6, noise=0.02, only=LLAVA_LLM.pattern)
    return root


def _recipe(root: Path, models: dict, **extra) -> object:
    doc = {"kind": "modality", "llm_base": str(root / "llama"), "models": models, "method": "task_arithmetic",
           "parameters": {"scale": 0.5}, "shard_size": "60KB", **extra}
    return parse_modality_recipe(doc)


def _llm_name(name: str) -> str | None:
    """The causal-LM name of a LLaVA-family checkpoint tensor (written out here, not taken from the key maps)."""
    if name.startswith("language_model.model."):
        return "model." + name[len("language_model.model."):]
    if name == "language_model.lm_head.weight":
        return "lm_head.weight"
    return None


def _raw(model_dir: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (dtype, raw bytes) of every tensor of a checkpoint directory."""
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                out[k] = (str(t.dtype), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def ta_out(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    recipe = _recipe(zoo, {"image": str(zoo / "llava_x"), "video": {"source": str(zoo / "vllava_x")}})
    out = tmp_path_factory.mktemp("ta") / "out"
    run_modality_merge(recipe, out, workers=2)
    return out


def test_builtin_keymaps_align_saved_names_of_each_architecture(zoo: Path, tmp_path: Path) -> None:
    base = set(load_state_dict(zoo / "llama"))
    for d, km in (("llava", "llava"), ("vllava", "video_llava")):
        names = list(load_state_dict(zoo / d))
        mapped = {load_keymap(km).canonical(n) for n in names} - {None}
        assert mapped == base  # every LLM tensor found, nothing else taken for one
        assert {n for n in names if load_keymap(km).canonical(n) is None} == {n for n in names if not _llm_name(n)}
    # The in-memory layout (saved by transformers 4.52-4.57) maps the same way.
    llava = load_keymap("llava")
    assert llava.canonical("model.language_model.layers.1.mlp.up_proj.weight") == "model.layers.1.mlp.up_proj.weight"
    assert llava.canonical("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") is None
    qwen = load_keymap("qwen2_vl")
    assert qwen.canonical("model.language_model.norm.weight") == "model.norm.weight"
    assert qwen.canonical("model.layers.0.self_attn.q_proj.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert qwen.canonical("model.visual.merger.mlp.0.weight") is None and qwen.canonical("visual.blocks.0.norm1.weight") is None


def test_recipe_problems_are_reported_together(zoo: Path) -> None:
    doc = {"kind": "modality", "llm_base": str(zoo / "llama"), "method": "task_arithmetc",
           "models": {"image": {"source": str(zoo / "llava_x"), "key_map": "lava"},
                      "video": {"source": str(zoo / "vllava_x"), "key_map": {"^language_model\\.(x)": "\\2"}}},
           "rules": [{"match": "*norm*", "action": "drop"}], "lora": {"merge": "products"}}
    with pytest.raises(RecipeError) as info:
        parse_modality_recipe(doc)
    problems = info.value.problems
    assert len(problems) == 5, problems
    assert problems[0] == ("model 'image' key_map: unknown key map 'lava'. Did you mean 'llava'? Built-in key maps: "
                           "causal_lm, llava, qwen2_audio, qwen2_vl, video_llava.")
    assert problems[1] == ("model 'video' key_map: replacement '\\\\2' of '^language_model\\\\.(x)' is invalid: group 2 "
                           "does not exist (the pattern has 1).")
    assert problems[2].startswith("default method: Unknown merge method 'task_arithmetc'. Did you mean 'task_arithmetic'?")
    assert problems[3] == ("rule 1: action must be merge, keep (base value into every model) or own (each model keeps "
                           "its own tensor); got 'drop' (a modality merge must keep every model complete, so nothing "
                           "is dropped).")
    assert problems[4].startswith("lora.merge must be 'delta'")
    with pytest.raises(RecipeError, match="needs a model-wide pre-pass, which modality merges do not run"):
        _recipe(zoo, {"image": str(zoo / "llava_x")}, method="ties", parameters={"scope": "model"})


def test_shared_llm_is_task_arithmetic_and_unique_tensors_are_carried_byte_for_byte(zoo: Path, ta_out: Path) -> None:
    base = load_state_dict(zoo / "llama")
    experts = {"image": load_state_dict(zoo / "llava_x"), "video": load_state_dict(zoo / "vllava_x")}
    sources = {"image": _raw(zoo / "llava_x"), "video": _raw(zoo / "vllava_x")}
    for name in ("image", "video"):
        out = load_state_dict(ta_out / "models" / name)
        raw = _raw(ta_out / "models" / name)
        assert set(out) == set(experts[name])  # the model's own checkpoint: every tensor, its own names
        for key, value in out.items():
            llm = _llm_name(key)
            if llm is None:
                assert raw[key] == sources[name][key], key  # encoders and connector: byte-equal to the source
                continue
            # θ = θ₀ + λ·Σ τ_m, τ_m = θ_m − θ₀ over both models' LLMs (each under its own name), λ = 0.5.
            tau = sum(experts[m][key].float() - base[llm].float() for m in experts)
            torch.testing.assert_close(value, base[llm] + 0.5 * tau, rtol=0, atol=1e-7)
    # The bundle holds the merged LLM once, under the causal-LM names, equal to what each model carries.
    llm = load_state_dict(ta_out / "omni" / "llm")
    assert set(llm) == set(base)
    image = load_state_dict(ta_out / "models" / "image")
    for n, value in llm.items():
        assert torch.equal(value, image["language_model.lm_head.weight" if n == "lm_head.weight" else "language_model." + n])
    assert set(load_state_dict(ta_out / "omni" / "modalities" / "video" / "weights")) == {
        n for n in experts["video"] if not _llm_name(n)}


def test_merged_models_load_with_transformers_and_run(ta_out: Path) -> None:
    from transformers import LlavaForConditionalGeneration, VideoLlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(ta_out / "models" / "image", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[0] + [IMAGE_TOKEN_ID] * 4 + [5, 6]])
    logits = model.eval()(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28)).logits
    assert logits.shape == (1, 7, 128) and torch.isfinite(logits).all()
    merged = load_state_dict(ta_out / "models" / "image")
    assert torch.equal(model.lm_head.weight, merged["language_model.lm_head.weight"])  # loaded, not re-initialised

    model, info = VideoLlavaForConditionalGeneration.from_pretrained(ta_out / "models" / "video",
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[0] + [VIDEO_TOKEN_ID] * 40 + [5, 6]])  # 8 frames × (4 patches + CLS)
    logits = model.eval()(input_ids=ids, pixel_values_videos=torch.randn(1, 8, 3, 28, 28)).logits
    assert logits.shape == (1, 43, 128) and torch.isfinite(logits).all()


def test_bundle_reassembles_every_model_byte_for_byte(ta_out: Path, tmp_path: Path) -> None:
    manifest = json.loads((ta_out / "omni" / "manifest.json").read_text())
    assert sorted(manifest["models"]) == ["image", "video"]
    assert manifest["models"]["video"]["architecture"] == "VideoLlavaForConditionalGeneration"
    for name in ("image", "video"):
        rebuilt = assemble_from_bundle(ta_out / "omni", name, tmp_path / name)
        assert _files(rebuilt) == _files(ta_out / "models" / name)
    with pytest.raises(ValueError, match=r"has no model 'audio'; it holds image, video"):
        assemble_from_bundle(ta_out / "omni", "audio", tmp_path / "audio")
    # A damaged bundle is caught by the sha256 the manifest recorded.
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(ta_out / "omni", damaged)
    weights = sorted((damaged / "modalities" / "image" / "weights").glob("*.safetensors"))[0]
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="the bundle was changed or damaged"):
        assemble_from_bundle(damaged, "image", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_same_name_different_shape_is_a_pinned_error_and_own_carries_it(zoo: Path, tmp_path: Path) -> None:
    # An image model whose vocabulary grew (an added token): embeddings and head are [130, 64].
    grown = tmp_path / "llava_grown"
    make_expert(zoo / "llava_x", grown, seed=9, noise=0.0)
    for f in grown.glob("*.safetensors"):
        tensors = load_file(f)
        for k in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            if k in tensors:
                tensors[k] = torch.cat([tensors[k], torch.ones(2, 64)])
        save_file(tensors, str(f), metadata={"format": "pt"})
    models = {"image": str(grown), "video": str(zoo / "vllava_x")}
    with pytest.raises(TensorMismatchError) as info:
        plan_modality(_recipe(zoo, models))
    msg = str(info.value)
    assert msg.startswith("2 problems with the modality merge inputs:")
    assert (f"Tensor 'model.embed_tokens.weight' of the shared LLM has different shapes: [130, 64] in model 'image' "
            f"('language_model.model.embed_tokens.weight'); [128, 64] in model 'video' "
            f"('language_model.model.embed_tokens.weight'); [128, 64] in the LLM base '{zoo / 'llama'}' "
            f"('model.embed_tokens.weight'). A shared LLM tensor must have one shape in every model; give it action: "
            f"own with a rule (each model keeps its own), or fix the key map.") in msg
    assert "Tensor 'lm_head.weight' of the shared LLM has different shapes" in msg

    rules = [{"regex": r"^(model\.embed_tokens|lm_head)\.weight$", "action": "own"}]
    out = tmp_path / "out"
    run_modality_merge(_recipe(zoo, models, rules=rules), out)
    merged, source = _raw(out / "models" / "image"), _raw(grown)
    assert merged["language_model.model.embed_tokens.weight"] == source["language_model.model.embed_tokens.weight"]
    video = _raw(out / "models" / "video")
    assert video["language_model.lm_head.weight"] == _raw(zoo / "vllava_x")["language_model.lm_head.weight"]
    assert merged["language_model.model.norm.weight"] != source["language_model.model.norm.weight"]  # still merged
    assert "model.embed_tokens.weight" not in load_state_dict(out / "omni" / "llm")


def test_failure_leaves_nothing_behind(zoo: Path, tmp_path: Path) -> None:
    broken = tmp_path / "vllava_nan"
    make_expert(zoo / "vllava_x", broken, seed=1, noise=0.0)
    for f in broken.glob("*.safetensors"):
        tensors = load_file(f)
        if "language_model.model.layers.1.mlp.up_proj.weight" in tensors:
            tensors["language_model.model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
            save_file(tensors, str(f), metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"Tensor 'model.layers.1.mlp.up_proj.weight' of model 'video' .* holds 1 "
                                             r"non-finite value"):
        run_modality_merge(_recipe(zoo, {"image": str(zoo / "llava_x"), "video": str(broken)}), out)
    assert list(tmp_path.iterdir()) == [broken]  # neither the output nor its staging


# ---- Qwen2 family: Qwen2-VL (image) and Qwen2-Audio (audio) on one Qwen2 LLM ------------------------------------

@pytest.fixture(scope="module")
def qwen_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qwen")
    build_qwen2_llm(root / "qwen2")
    build_qwen2vl_on(root / "qwen2", root / "qvl")
    build_qwen2audio_on(root / "qwen2", root / "qaudio")
    make_expert(root / "qvl", root / "qvl_x", seed=7, noise=0.02, only=r"^(model\.|lm_head)")
    make_expert(root / "qaudio", root / "qaudio_x", seed=8, noise=0.02, only=r"^language_model\.")
    return root


def test_qwen2vl_and_qwen2audio_share_a_qwen2_llm(qwen_zoo: Path, tmp_path: Path) -> None:
    from transformers import Qwen2AudioForConditionalGeneration, Qwen2VLForConditionalGeneration

    recipe = parse_modality_recipe({
        "kind": "modality", "llm_base": str(qwen_zoo / "qwen2"), "method": "weight_average",
        "models": {"vision": str(qwen_zoo / "qvl_x"), "audio": str(qwen_zoo / "qaudio_x")},
        "rules": [{"match": "*norm.weight", "action": "keep"}]})
    plan = plan_modality(recipe)
    assert [m.key_map.name for m in plan.models] == ["qwen2_vl", "qwen2_audio"]
    out = tmp_path / "out"
    run_modality_merge(recipe, out)
    base = load_state_dict(qwen_zoo / "qwen2")
    vl, audio = load_state_dict(qwen_zoo / "qvl_x"), load_state_dict(qwen_zoo / "qaudio_x")
    merged_vl, merged_audio = load_state_dict(out / "models" / "vision"), load_state_dict(out / "models" / "audio")
    for name, b in base.items():
        vl_name = name  # Qwen2-VL's text stack is saved under the causal-LM names
        audio_name = "language_model." + name
        if name.endswith("norm.weight"):  # kept: the base's value in both models
            expected = b
        else:  # weight average: θ₀ + mean(τ_vl, τ_audio)
            expected = b + ((vl[vl_name] - b) + (audio[audio_name] - b)) / 2
        torch.testing.assert_close(merged_vl[vl_name], expected, rtol=0, atol=1e-7)
        assert torch.equal(merged_vl[vl_name], merged_audio[audio_name])
    raw_vl, raw_src = _raw(out / "models" / "vision"), _raw(qwen_zoo / "qvl_x")
    assert all(raw_vl[k] == raw_src[k] for k in raw_src if k.startswith("visual."))
    raw_audio, raw_asrc = _raw(out / "models" / "audio"), _raw(qwen_zoo / "qaudio_x")
    assert all(raw_audio[k] == raw_asrc[k] for k in raw_asrc if not k.startswith("language_model."))

    model, info = Qwen2AudioForConditionalGeneration.from_pretrained(out / "models" / "audio", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[0] + [AUDIO_TOKEN_ID] * 25 + [5, 6, 7]])  # 100 frames → 25 audio tokens
    logits = model.eval()(input_ids=ids, input_features=torch.randn(1, 16, 100),
                          feature_attention_mask=torch.ones(1, 100, dtype=torch.long),
                          attention_mask=torch.ones_like(ids)).logits
    assert logits.shape == (1, 29, 128) and torch.isfinite(logits).all()
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(out / "models" / "vision", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.isfinite(model.eval()(input_ids=torch.tensor([[0, 5, 6, 7]])).logits).all()
    for name in ("vision", "audio"):
        assert _files(assemble_from_bundle(out / "omni", name, tmp_path / f"re-{name}")) == _files(out / "models" / name)


# ---- LoRA modality experts -----------------------------------------------------------------------------------------

_LLM_TARGETS = r".*language_model.*\.(q_proj|v_proj|down_proj)"


@pytest.fixture(scope="module")
def lora_zoo(zoo: Path) -> Path:
    """LoRA adapters on the LLM of llava / vllava (whose LLMs equal the shared base), projector in modules_to_save."""
    make_lora(zoo / "llava", zoo / "lora_image", seed=21, r=4, alpha=8, layers_regex=_LLM_TARGETS)
    make_lora(zoo / "vllava", zoo / "lora_video", seed=22, r=4, alpha=16, layers_regex=_LLM_TARGETS)
    return zoo


def _merge_and_unload(model_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge, as the model's in-memory state dict (float32)."""
    import transformers
    from peft import PeftModel

    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(model_dir, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict().items()}


def _in_memory_llm(name: str) -> str | None:
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return "lm_head.weight" if name == "lm_head.weight" else None


def _lora_models(zoo: Path) -> dict:
    return {"image": {"source": str(zoo / "llava"), "adapter": str(zoo / "lora_image")},
            "video": {"source": str(zoo / "vllava"), "adapter": str(zoo / "lora_video")}}


def test_lora_delta_merge_equals_merge_of_merge_and_unload_deltas(lora_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_modality_merge(_recipe(lora_zoo, _lora_models(lora_zoo), parameters={"scale": 1.0}), out)
    base = load_state_dict(lora_zoo / "llama")
    unloaded = {"image": _merge_and_unload(lora_zoo / "llava", lora_zoo / "lora_image"),
                "video": _merge_and_unload(lora_zoo / "vllava", lora_zoo / "lora_video")}
    deltas: dict[str, torch.Tensor] = {}
    for state in unloaded.values():
        for k, v in state.items():
            if (llm := _in_memory_llm(k)) is not None:
                deltas[llm] = deltas.get(llm, 0) + (v - base[llm])
    merged = load_state_dict(out / "models" / "image")
    moved = 0
    for key, value in merged.items():
        if (llm := _llm_name(key)) is not None:
            torch.testing.assert_close(value, base[llm] + deltas[llm], rtol=0, atol=2e-6)
            moved += int(not torch.equal(value, base[llm]))
    assert moved == 6  # q, v, down of 2 layers carry LoRA deltas; everything else stays at base
    # The connector is the adapter's modules_to_save copy, byte for byte; the vision tower is the source's.
    adapter = load_file(lora_zoo / "lora_image" / "adapter_model.safetensors")
    projector = {k.split("multi_modal_projector.")[1]: v for k, v in adapter.items() if "multi_modal_projector" in k}
    assert len(projector) == 4
    for k, v in projector.items():
        assert merged[f"multi_modal_projector.{k}"].numpy().tobytes() == v.numpy().tobytes()
        assert torch.equal(unloaded["image"][f"model.multi_modal_projector.{k}"], v)
    assert _raw(out / "models" / "image")["vision_tower.post_layernorm.weight"] == \
        _raw(lora_zoo / "llava")["vision_tower.post_layernorm.weight"]


def test_lora_factor_wise_merge_computes_what_its_docstring_says(lora_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = _recipe(lora_zoo, _lora_models(lora_zoo), parameters={"scale": 1.0}, lora={"merge": "factors"})
    run_modality_merge(recipe, out)
    base = load_state_dict(lora_zoo / "llama")
    adapters = [(load_file(lora_zoo / "lora_image" / "adapter_model.safetensors"), 8 / 4),
                (load_file(lora_zoo / "lora_video" / "adapter_model.safetensors"), 16 / 4)]
    merged = load_state_dict(out / "models" / "video")
    factor_targets = 0
    for key, value in merged.items():
        if (llm := _llm_name(key)) is None:
            continue
        module = "base_model.model.model.language_model." + llm[len("model."):-len(".weight")]
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        if a_key not in adapters[0][0]:
            assert torch.equal(value, base[llm])  # no LoRA on it: task arithmetic of zero task vectors
            continue
        # Ā = Σ Aᵢ, B̄ = Σ sᵢ Bᵢ (sᵢ = α/r), ΔW = B̄ Ā — the merge of the factors, not of the products.
        a_bar = sum(a[a_key] for a, _ in adapters)
        b_bar = sum(s * a[b_key] for a, s in adapters)
        torch.testing.assert_close(value, base[llm] + b_bar @ a_bar, rtol=0, atol=2e-6)
        products = sum(s * a[b_key] @ a[a_key] for a, s in adapters)
        assert not torch.allclose(value, base[llm] + products, atol=1e-4)  # the cross terms Bᵢ Aⱼ are in it
        factor_targets += 1
    assert factor_targets == 6
    plan = plan_modality(recipe)
    assert sorted({t.action for t in plan.shared}) == ["factors", "merge"]


# ---- command line and side-by-side evaluation ----------------------------------------------------------------------

def _run_cli(argv: list[str]) -> int:
    import argparse

    from omnimerge.cluster.cli_modality import register

    parser = argparse.ArgumentParser(prog="omnimerge")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_merges_then_evaluates_each_model_beside_its_source(zoo: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from test_evaluator_support import png_bytes

    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(2):
        (data / f"img{i}.png").write_bytes(png_bytes(i, (28, 28)))
        rows.append({"question_id": f"q{i}", "image": f"img{i}.png", "question": "what colour is the circle ?",
                     "answers": ["red"]})
    (data / "shapes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = data / "suite.yaml"  # short answers keep generation cheap
    suite.write_text(f"name: tiny\ntasks:\n  - {{name: shapes, path: {data / 'shapes.jsonl'}, metric: vqa_accuracy, "
                     f"max_new_tokens: 3}}\n")
    recipe = tmp_path / "omni.yaml"
    recipe.write_text(f"kind: modality\nllm_base: {zoo / 'llama'}\nmethod: task_arithmetic\nparameters: {{scale: 0.5}}\n"
                      f"models:\n  image: {zoo / 'llava_x'}\n  video: {{source: {zoo / 'vllava_x'}, key_map: video_llava}}\n")
    assert _run_cli(["modality", str(recipe), "--dry-run"]) == 0
    assert "model 'video': VideoLlavaForConditionalGeneration" in capsys.readouterr().out
    out = tmp_path / "out"
    assert _run_cli(["modality", str(recipe), "-o", str(out), "--eval-suite", str(suite), "--executor",
                     "local", "--batch-size", "2"]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(out / "eval" / "results.parquet").to_pylist()  # Video-LLaVA takes images too
    assert sorted((r["model"], r["role"], r["task"], r["samples"]) for r in table) == [
        (f"{name}-{kind}", role, "shapes", 2) for name in ("image", "video")
        for kind, role in (("merged", "merged"), ("source", "expert"))]  # fmt: skip
    for name in ("image", "video"):
        report = (out / "eval" / name / "report.md").read_text()
        assert f"{name}-merged" in report and f"{name}-source" in report
    assert _run_cli(["omni-assemble", str(out / "omni"), "video", "-o", str(tmp_path / "video")]) == 0
    assert _files(tmp_path / "video") == _files(out / "models" / "video")


def test_unknown_architecture_without_key_map_is_a_recipe_error(zoo: Path, tmp_path: Path) -> None:
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(zoo / "vllava_x", odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["OddForConditionalGeneration"]}))
    with pytest.raises(RecipeError) as info:
        plan_modality(_recipe(zoo, {"image": str(zoo / "llava_x"), "video": str(odd)}))
    assert info.value.problems == [
        f"model 'video' ('{odd}', architecture OddForConditionalGeneration) has no built-in key map; give key_map: "
        "NAME or an inline {regex: replacement} map. Built-in maps cover LlamaForCausalLM, LlavaForConditionalGeneration, "
        "LlavaNextForConditionalGeneration, LlavaNextVideoForConditionalGeneration, MistralForCausalLM, "
        "Qwen2AudioForConditionalGeneration, Qwen2ForCausalLM, Qwen2VLForConditionalGeneration, "
        "Qwen2_5_VLForConditionalGeneration, VideoLlavaForConditionalGeneration."]
    # Naming the map (inline here) is enough.
    inline = {"^language_model\\.model\\.": "model.", "^language_model\\.lm_head\\.": "lm_head."}
    plan = plan_modality(_recipe(zoo, {"image": str(zoo / "llava_x"), "video": {"source": str(odd), "key_map": inline}}))
    assert plan.models[1].key_map.name == "inline" and len(plan.models[1].llm) == 21
