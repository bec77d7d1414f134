"""Tiny real checkpoints for tests: transformers models built from configs, saved as Hugging Face does.

Everything here writes real files through the real libraries (transformers ``save_pretrained``, peft,
huggingface_hub's cache layout), small enough to build in well under a second each.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "build_tiny_qwen2vl",
    "build_tiny_llava",
    "make_expert",
    "make_lora_adapter",
    "write_hf_cache",
    "load_state_dict",
]

# What the saved files hold: weights, configs, indexes.
_WEIGHT_SUFFIX = ".safetensors"


def _tiny_qwen2vl_config():
    from transformers import Qwen2VLConfig

    head_dim = 64 // 4  # hidden / heads = 16 → mrope_section must sum to 8
    return Qwen2VLConfig(
        text_config={
            "vocab_size": 128,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 2,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=120,
        video_token_id=121,
        vision_start_token_id=122,
        vision_end_token_id=123,
        tie_word_embeddings=False,
    ), head_dim


def _save(model, out_dir: Path, max_shard_size: str | int, dtype: torch.dtype) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return out_dir


def build_tiny_qwen2vl(
    out_dir: Path | str, *, seed: int = 0, max_shard_size: str | int = "40KB", dtype: torch.dtype = torch.float32
) -> Path:
    """A tiny ``Qwen2VLForConditionalGeneration`` (text hidden 64, 2 layers, 4 heads / 2 KV; vision embed
    32, depth 2) saved sharded as safetensors with config.json and generation_config.json."""
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    config, _ = _tiny_qwen2vl_config()
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, max_new_tokens=8)
    return _save(model, Path(out_dir), max_shard_size, dtype)


def build_tiny_llava(
    out_dir: Path | str, *, seed: int = 0, max_shard_size: str | int = "40KB", dtype: torch.dtype = torch.float32
) -> Path:
    """A tiny ``LlavaForConditionalGeneration``: Llama text model (hidden 64, 2 layers, 4 heads / 2 KV) and a
    CLIP vision tower (hidden 32, 2 layers, 28×28 images of 14×14 patches), saved sharded."""
    from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
        patch_size=14, projection_dim=32,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=120, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, max_new_tokens=8)
    return _save(model, Path(out_dir), max_shard_size, dtype)


def load_state_dict(model_dir: Path | str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory, by name (for expectations in tests)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob(f"*{_WEIGHT_SUFFIX}")):
        out.update(load_file(f))
    return out


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def make_expert(
    base_dir: Path | str, out_dir: Path | str, *, seed: int, noise: float = 1e-2, only: str | None = None
) -> Path:
    """Copy a base checkpoint and add ``noise · N(0, 1)`` to its floating tensors.

    The noise of each tensor is drawn from a generator seeded by ``(seed, tensor name)``, so the expert is
    the same whatever order tensors are visited in. ``only`` is a regex (``re.search``) restricting which
    tensors are perturbed. Files, sharding, index and metadata are kept as in the base.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(only) if only is not None else None
    for src in sorted(base_dir.iterdir()):
        if not src.is_file():
            continue
        if src.suffix != _WEIGHT_SUFFIX:
            shutil.copyfile(src, out_dir / src.name)
            continue
        from safetensors import safe_open

        with safe_open(str(src), framework="pt") as f:
            metadata = f.metadata()
            names = list(f.keys())
            tensors = {n: f.get_tensor(n) for n in names}
        for name, t in tensors.items():
            if not t.is_floating_point() or (pattern is not None and not pattern.search(name)):
                continue
            g = torch.Generator().manual_seed(_seed_for(seed, name))
            tensors[name] = (t.float() + noise * torch.randn(t.shape, generator=g)).to(t.dtype)
        save_file(tensors, str(out_dir / src.name), metadata=metadata)
    return out_dir


def make_lora_adapter(
    base_dir: Path | str,
    out_dir: Path | str,
    *,
    seed: int,
    r: int = 4,
    alpha: int = 8,
    use_rslora: bool = False,
    target_modules: Sequence[str] | str = ("q_proj", "v_proj"),
    modules_to_save: Sequence[str] | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    use_dora: bool = False,
    lora_init_scale: float = 0.1,
) -> Path:
    """A real PEFT LoRA adapter on the base at ``base_dir``, saved with ``save_pretrained``.

    Both factors are drawn at random (``lora_B`` too, so the delta is not zero) from a generator seeded by
    ``seed`` and the parameter name. ``target_modules`` is PEFT's (list of suffixes or a regex string).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        use_dora=use_dora,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                g = torch.Generator().manual_seed(_seed_for(seed, name))
                p.copy_(lora_init_scale * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out_dir)
    return out_dir


def write_hf_cache(cache_dir: Path | str, repo_id: str, src_dir: Path | str, revision: str = "main") -> str:
    """Lay out ``src_dir`` as a Hugging Face hub cache entry for ``repo_id`` and return its commit hash.

    Produces ``models--org--name/blobs/<sha256>`` (file contents), ``snapshots/<commit>/<file>`` (relative
    symlinks into blobs, as huggingface_hub makes them) and ``refs/<revision>`` holding the commit, so
    ``snapshot_download(repo_id, cache_dir=..., local_files_only=True)`` finds it offline.
    """
    cache_dir, src_dir = Path(cache_dir), Path(src_dir)
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in src_dir.rglob("*") if p.is_file())
    commit = hashlib.sha1()
    for p in files:
        commit.update(p.relative_to(src_dir).as_posix().encode() + b"\0" + p.read_bytes())
    commit_hash = commit.hexdigest()
    snapshot = repo / "snapshots" / commit_hash
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for p in files:
        blob_id = hashlib.sha256(p.read_bytes()).hexdigest()
        blob = repo / "blobs" / blob_id
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snapshot / p.relative_to(src_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..", *([".."] * (len(p.relative_to(src_dir).parts))), "blobs", blob_id))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit_hash)
    return commit_hash
