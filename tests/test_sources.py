"""Resolving what a recipe names: local dirs, hub ids through an offline cache, LoRA adapters (engine/sources.py)."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build_tiny_qwen2vl, load_state_dict, make_expert, make_lora_adapter, write_hf_cache  # noqa: E402

from omnimerge.engine.errors import SourceError, SourceNotFoundError, UnsafeCheckpointError  # noqa: E402
from omnimerge.engine.sources import (  # noqa: E402
    HUB_ALLOW_PATTERNS,
    HUB_PICKLE_PATTERNS,
    ResolvedSource,
    SourceSpec,
    resolve_source,
)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    base = build_tiny_qwen2vl(root / "base")
    return {
        "base": base,
        "expert": make_expert(base, root / "expert", seed=1, only=r"layers\.0\."),
        "lora": make_lora_adapter(base, root / "lora", seed=2),
    }


def test_local_model(zoo) -> None:
    src = resolve_source(SourceSpec(str(zoo["base"])), label="base")
    assert (src.label, src.kind, src.path, src.revision, src.lora) == ("base", "model", zoo["base"], None, None)
    assert len(src.index) == 58 and not src.remote_code
    assert src.config()["model_type"] == "qwen2_vl"
    with src.reader() as r:
        assert torch.equal(r.read("lm_head.weight"), load_state_dict(zoo["base"])["lm_head.weight"])


def test_fingerprint_is_stable_and_tracks_inputs(zoo, tmp_path) -> None:
    a = resolve_source(SourceSpec(str(zoo["base"])), label="base")
    b = resolve_source(SourceSpec(str(zoo["base"])), label="other-label")
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64
    assert resolve_source(SourceSpec(str(zoo["expert"])), label="e").fingerprint() != a.fingerprint()
    # Same files, one shard rewritten with another layout: the fingerprint moves.
    copy = tmp_path / "copy"
    shutil.copytree(zoo["base"], copy)
    assert resolve_source(SourceSpec(str(copy)), label="c").fingerprint() == a.fingerprint()
    from safetensors.torch import load_file, save_file

    shard = sorted(copy.glob("model-*.safetensors"))[0]
    tensors = load_file(str(shard))
    save_file(tensors, str(shard), metadata={"format": "pt", "edited": "yes"})
    assert resolve_source(SourceSpec(str(copy)), label="c").fingerprint() != a.fingerprint()
    # Same layout and metadata, other values, mtime put back: the data sample in the digest catches it.
    original = zoo["base"] / shard.name
    save_file({k: v + 1 for k, v in load_file(str(original)).items()}, str(shard), metadata={"format": "pt"})
    st = original.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size
    assert resolve_source(SourceSpec(str(copy)), label="c").fingerprint() != a.fingerprint()
    # Same bytes written again later: only the mtime differs, and local sources count it.
    shutil.copyfile(original, shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert resolve_source(SourceSpec(str(copy)), label="c").fingerprint() != a.fingerprint()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert resolve_source(SourceSpec(str(copy)), label="c").fingerprint() == a.fingerprint()


def test_resolved_source_pickles(zoo) -> None:
    base = resolve_source(SourceSpec(str(zoo["base"])), label="base")
    lora = resolve_source(SourceSpec(str(zoo["lora"])), label="ocr", base=base)
    for src in (base, lora):
        again: ResolvedSource = pickle.loads(pickle.dumps(src))
        assert again.fingerprint() == src.fingerprint() and again.index.names() == src.index.names()
        with again.reader() as r:
            name = again.index.names()[0]
            with src.reader() as r0:
                assert torch.equal(r.read(name), r0.read(name))
    assert pickle.loads(pickle.dumps(lora)).lora.names() == lora.lora.names()


def test_lora_source(zoo) -> None:
    base = resolve_source(SourceSpec(str(zoo["base"])), label="base")
    lora = resolve_source(SourceSpec(str(zoo["lora"])), label="ocr", base=base)
    assert lora.kind == "lora" and lora.lora is not None
    assert lora.lora.names() == [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in ("q", "v")]
    assert set(lora.index.names()) == {t.a_name for t in lora.lora.targets.values()} | {
        t.b_name for t in lora.lora.targets.values()}
    assert lora.config() is None
    assert lora.fingerprint() != base.fingerprint()
    explicit = resolve_source(SourceSpec(str(zoo["lora"]), kind="lora"), label="ocr", base=base)
    assert explicit.fingerprint() == lora.fingerprint()


def test_lora_needs_base(zoo) -> None:
    with pytest.raises(SourceError) as e:
        resolve_source(SourceSpec(str(zoo["lora"])), label="ocr")
    assert str(e.value) == (
        f"LoRA source 'ocr' ('{zoo['lora']}') needs the resolved base model to map its tensors; resolve the base "
        "first and pass it as base=."
    )


def test_kind_disagrees_with_directory(zoo) -> None:
    base = resolve_source(SourceSpec(str(zoo["base"])), label="base")
    with pytest.raises(SourceError, match=r"Source 'ocr' \('.*lora'\) is a LoRA adapter \(adapter_config.json\) but "
                                          r"the recipe says kind: model. Set kind: lora"):
        resolve_source(SourceSpec(str(zoo["lora"]), kind="model"), label="ocr", base=base)
    with pytest.raises(SourceError, match=r"has kind: lora but '.*base' has no adapter_config.json"):
        resolve_source(SourceSpec(str(zoo["base"]), kind="lora"), label="x", base=base)
    with pytest.raises(SourceError, match=r"kind 'qlora'; it must be one of auto, model, lora"):
        SourceSpec("x", kind="qlora")


def test_missing_local_paths(tmp_path) -> None:
    with pytest.raises(SourceNotFoundError) as e:
        resolve_source(SourceSpec("./models/nope"), label="chart")
    assert str(e.value) == (
        "Source 'chart': './models/nope' is neither an existing directory nor a hub repo id (org/name). Check the path."
    )
    with pytest.raises(SourceNotFoundError, match=r"'nope' is neither an existing directory"):
        resolve_source(SourceSpec("nope"), label="x")
    with pytest.raises(SourceNotFoundError, match=r"'/abs/org/name' is neither"):
        resolve_source(SourceSpec("/abs/org/name"), label="x")
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(SourceError, match=r"is a file; give the model directory that holds it"):
        resolve_source(SourceSpec(str(f)), label="x")


def test_pickle_source_refused_then_allowed(tmp_path) -> None:
    torch.save({"w": torch.ones(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match=r"Pickle files can run arbitrary code"):
        resolve_source(SourceSpec(str(tmp_path)), label="old")
    src = resolve_source(SourceSpec(str(tmp_path)), label="old", allow_pickle=True)
    with src.reader() as r:
        assert torch.equal(r.read("w"), torch.ones(2, 2))


def test_remote_code_is_noted_never_run(zoo, tmp_path, caplog) -> None:
    d = tmp_path / "custom"
    shutil.copytree(zoo["base"], d)
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(config))
    (d / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with caplog.at_level(logging.WARNING, logger="omnimerge.engine.sources"):
        src = resolve_source(SourceSpec(str(d)), label="custom")
    assert src.remote_code
    assert "declares custom code (auto_map" in caplog.text and "never runs it" in caplog.text


# -- hub ------------------------------------------------------------------------------------------------------


def test_hub_patterns_fetch_weights_and_configs_but_no_code() -> None:
    def fetched(name: str, patterns=HUB_ALLOW_PATTERNS) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in patterns)

    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json",
                 "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                 "special_tokens_map.json", "preprocessor_config.json", "processor_config.json",
                 "chat_template.json", "chat_template.jinja", "merges.txt", "vocab.json",
                 "adapter_config.json", "adapter_model.safetensors"):
        assert fetched(name), name
    for name in ("modeling_qwen.py", "configuration_x.py", "pytorch_model.bin", "optimizer.pt"):
        assert not fetched(name), name
    assert fetched("pytorch_model-00001-of-00002.bin", HUB_PICKLE_PATTERNS)


def test_hub_id_offline_from_cache(zoo, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    commit = write_hf_cache(cache, "tiny-org/tiny-qwen2vl", zoo["base"])
    src = resolve_source(SourceSpec("tiny-org/tiny-qwen2vl"), label="base", cache_dir=str(cache))
    assert src.revision == commit and src.kind == "model"
    assert src.path == cache / "models--tiny-org--tiny-qwen2vl" / "snapshots" / commit
    local = resolve_source(SourceSpec(str(zoo["base"])), label="base")
    assert src.index.names() == local.index.names()
    with src.reader() as r, local.reader() as r0:
        for name in src.index.names():
            assert torch.equal(r.read(name), r0.read(name))
    # Same files, but the hub revision is part of the fingerprint.
    assert src.fingerprint() != local.fingerprint()
    # A hub snapshot's fingerprint ignores file times (the commit pins the content).
    blob = next((cache / "models--tiny-org--tiny-qwen2vl" / "blobs").iterdir())
    os.utime(blob, ns=(0, 10**9))
    again = resolve_source(SourceSpec("tiny-org/tiny-qwen2vl"), label="base", cache_dir=str(cache))
    assert again.fingerprint() == src.fingerprint()
    by_ref = resolve_source(SourceSpec("tiny-org/tiny-qwen2vl", revision="main"), label="b", cache_dir=str(cache))
    by_commit = resolve_source(SourceSpec("tiny-org/tiny-qwen2vl", revision=commit), label="b", cache_dir=str(cache))
    assert by_ref.path == by_commit.path == src.path


def test_hub_lora_offline(zoo, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    write_hf_cache(cache, "tiny-org/base", zoo["base"])
    write_hf_cache(cache, "tiny-org/ocr-lora", zoo["lora"])
    base = resolve_source(SourceSpec("tiny-org/base"), label="base", cache_dir=str(cache))
    lora = resolve_source(SourceSpec("tiny-org/ocr-lora"), label="ocr", base=base, cache_dir=str(cache))
    assert lora.kind == "lora" and len(lora.lora.targets) == 4


def test_hub_id_not_cached_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "empty-hub"
    with pytest.raises(SourceNotFoundError) as e:
        resolve_source(SourceSpec("tiny-org/absent", revision="v1"), label="chart", cache_dir=str(cache))
    assert str(e.value) == (
        f"Source 'chart': hub repo 'tiny-org/absent' at revision 'v1' is not in the local cache ({cache}) and "
        "HF_HUB_OFFLINE is set, so nothing was downloaded. Download it first (`hf download tiny-org/absent`) or "
        "unset HF_HUB_OFFLINE."
    )


# -- the shared tiny-model helpers ----------------------------------------------------------------------------


def test_make_expert_is_deterministic_and_selective(zoo, tmp_path) -> None:
    base = load_state_dict(zoo["base"])
    expert = load_state_dict(zoo["expert"])
    again = load_state_dict(make_expert(zoo["base"], tmp_path / "again", seed=1, only=r"layers\.0\."))
    assert sorted(p.name for p in zoo["expert"].iterdir()) == sorted(p.name for p in zoo["base"].iterdir())
    for name, t in base.items():
        assert torch.equal(expert[name], again[name])
        if "layers.0." in name:
            diff = (expert[name] - t).abs()
            assert 0 < diff.max() < 0.1, name  # noise 1e-2 · N(0, 1)
        else:
            assert torch.equal(expert[name], t), name


def test_tiny_llava_loads_and_runs(tmp_path) -> None:
    from tiny_models import build_tiny_llava
    from transformers import LlavaForConditionalGeneration

    d = build_tiny_llava(tmp_path / "llava")
    assert len(list(d.glob("model-*.safetensors"))) > 1 and (d / "generation_config.json").is_file()
    model = LlavaForConditionalGeneration.from_pretrained(d)
    ids = torch.tensor([[3] + [120] * 4 + [5, 6]])  # 120 is the image token: 28×28 → 4 patches (CLS dropped)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.zeros(1, 3, 28, 28))
    assert out.logits.shape == (1, 7, 128) and torch.isfinite(out.logits).all()
