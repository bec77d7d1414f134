"""Synthetic base + experts in the Qwen2-0.5B layout, for merge benchmarks.

``make_qwen2_05b_set(out_dir)`` writes ``base/`` and ``expert_{i}/`` as real Hugging Face checkpoints:
``config.json`` (the published ``Qwen/Qwen2-0.5B`` config: hidden 896, 24 layers, intermediate 4864,
14 heads / 2 KV heads, vocab 151936, tied embeddings so there is no ``lm_head.weight``, biases on
q/k/v), ``generation_config.json`` and safetensors shards with ``model.safetensors.index.json``.

Values are random, not trained: linear weights and embeddings ~ N(0, 0.02²) (the config's
``initializer_range``), biases ~ N(0, 0.02²), norm weights 1 + N(0, 0.02²); expert ``i`` is
``base + N(0, delta_std²)`` per tensor. Every tensor is drawn from a generator seeded by
(seed, model, tensor name), so the files are deterministic per seed and independent of write order.
Memory stays bounded: the set is written shard by shard (one base shard and one expert shard in memory
at a time), and large tensors are drawn in row chunks.

Usable as a script::

    python benchmarks/make_synthetic.py OUT_DIR [--experts 4] [--layers 24] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

__all__ = ["QWEN2_05B_CONFIG", "GENERATION_CONFIG", "make_qwen2_05b_set", "qwen2_tensor_shapes",
           "plan_shards", "parse_size"]

logger = logging.getLogger(__name__)

#: ``Qwen/Qwen2-0.5B`` config.json as published (num_hidden_layers / torch_dtype are overridden per set).
QWEN2_05B_CONFIG: dict = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 131072,
    "max_window_layers": 24,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

#: ``Qwen/Qwen2-0.5B`` generation_config.json.
GENERATION_CONFIG: dict = {
    "bos_token_id": 151643,
    "do_sample": False,
    "eos_token_id": 151643,
    "max_new_tokens": 2048,
    "transformers_version": "4.37.0",
}

_INIT_STD = 0.02
_CHUNK_ELEMENTS = 1 << 23  # draw large tensors 8M values (32 MB of float32) at a time
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """``"200MB"`` → 200_000_000 (decimal units as ``transformers`` uses; KiB/MiB/GiB binary)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", size.upper())
    if not match:
        raise ValueError(f"Cannot parse size {size!r}; expected e.g. '200MB', '1GB', '512MiB' or a byte count.")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"])


def qwen2_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape for ``Qwen2ForCausalLM``, in the order ``save_pretrained`` writes them."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, max_shard_size: int) -> list[list[str]]:
    """Greedy split in order, as ``transformers`` does: a tensor opens a new shard when it would overflow.

    A tensor larger than ``max_shard_size`` gets a shard of its own.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize
        for dim in shape:
            nbytes *= dim
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _generator(seed: int, model: str, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{model}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _chunks(shape: tuple[int, ...]) -> Iterator[slice]:
    rows = shape[0]
    per_row = max(1, _numel(shape[1:]))
    step = max(1, _CHUNK_ELEMENTS // per_row)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _base_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = _generator(seed, "base", name)
    out = torch.empty(shape, dtype=dtype)
    offset = 1.0 if name.endswith("norm.weight") else 0.0
    for rows in _chunks(shape):
        block = torch.randn((rows.stop - rows.start, *shape[1:]), generator=gen, dtype=torch.float32)
        out[rows] = block.mul_(_INIT_STD).add_(offset).to(dtype)
    return out


def _expert_tensor(base: torch.Tensor, name: str, expert: int, seed: int, delta_std: float) -> torch.Tensor:
    gen = _generator(seed, f"expert_{expert}", name)
    out = torch.empty_like(base)
    for rows in _chunks(tuple(base.shape)):
        block = torch.randn((rows.stop - rows.start, *base.shape[1:]), generator=gen, dtype=torch.float32)
        out[rows] = block.mul_(delta_std).add_(base[rows].float()).to(base.dtype)
    return out


def _write_model_files(model_dir: Path, config: dict, shards: list[list[str]], shapes: dict, itemsize: int) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (model_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    total = sum(_numel(s) for s in shapes.values()) * itemsize
    weight_map = {name: _shard_name(i, len(shards)) for i, names in enumerate(shards) for name in names}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _is_complete(model_dir: Path, n_shards: int, config: dict) -> bool:
    try:
        if json.loads((model_dir / "config.json").read_text()) != config:
            return False
    except (OSError, ValueError):
        return False
    if not (model_dir / "model.safetensors.index.json").is_file():
        return False
    return all((model_dir / _shard_name(i, n_shards)).is_file() for i in range(n_shards))


def make_qwen2_05b_set(out_dir: str | Path, n_experts: int = 4, dtype: str = "bfloat16", layers: int | None = None,
                       seed: int = 0, max_shard_size: str | int = "200MB", *, delta_std: float = 0.002,
                       overwrite: bool = False) -> dict:
    """Write a base and ``n_experts`` experts in the Qwen2-0.5B layout under ``out_dir``.

    Args:
        out_dir: Folder that receives ``base/`` and ``expert_0/`` … ``expert_{n-1}/``.
        n_experts: Number of experts.
        dtype: Storage dtype name (``"bfloat16"``, ``"float16"``, ``"float32"``).
        layers: Number of decoder layers (default: the real model's 24); fewer for quick runs.
        seed: Seed; the same arguments give byte-identical files.
        max_shard_size: Shard size limit, e.g. ``"200MB"``; the embedding (272 MB in bf16) gets a shard alone.
        delta_std: Standard deviation of each expert's task vector.
        overwrite: Rewrite models whose files already exist (otherwise a complete model is kept).

    Returns:
        ``{"base": path, "experts": [paths], "config": dict, "n_params": int, "bytes_per_model": int,
        "n_shards": int, "seconds": float}``.
    """
    start = time.perf_counter()
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use 'bfloat16', 'float16' or 'float32'.")
    if n_experts < 0:
        raise ValueError(f"n_experts must be >= 0, got {n_experts}.")
    config = dict(QWEN2_05B_CONFIG)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}.")
        config["num_hidden_layers"] = layers
        config["max_window_layers"] = layers
    config["torch_dtype"] = dtype
    shapes = qwen2_tensor_shapes(config)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards = plan_shards(shapes, itemsize, parse_size(max_shard_size))

    out = Path(out_dir)
    models = {"base": out / "base"} | {f"expert_{i}": out / f"expert_{i}" for i in range(n_experts)}
    marker = out / "synthetic_set.json"
    params = {"seed": seed, "dtype": dtype, "layers": config["num_hidden_layers"], "delta_std": delta_std,
              "max_shard_size": parse_size(max_shard_size)}
    try:
        same_params = json.loads(marker.read_text()) == params
    except (OSError, ValueError):
        same_params = False
    todo = {m: d for m, d in models.items()
            if overwrite or not same_params or not _is_complete(d, len(shards), config)}
    if "base" in todo:
        todo = dict(models)  # experts derive from the base: a rewritten base invalidates them
    if todo:
        out.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
    for model_dir in todo.values():
        for stale in [*model_dir.glob("*.safetensors"), model_dir / "config.json"]:
            stale.unlink(missing_ok=True)
    expert_ids = [i for i in range(n_experts) if f"expert_{i}" in todo]
    for shard_no, names in enumerate(shards if todo else []):
        base = {name: _base_tensor(name, shapes[name], torch_dtype, seed) for name in names}
        file_name = _shard_name(shard_no, len(shards))
        if "base" in todo:
            todo["base"].mkdir(parents=True, exist_ok=True)
            save_file(base, str(todo["base"] / file_name), metadata={"format": "pt"})
        for i in expert_ids:
            expert = {name: _expert_tensor(t, name, i, seed, delta_std) for name, t in base.items()}
            todo[f"expert_{i}"].mkdir(parents=True, exist_ok=True)
            save_file(expert, str(todo[f"expert_{i}"] / file_name), metadata={"format": "pt"})
            del expert
        del base
        logger.info("wrote shard %d/%d for %d models", shard_no + 1, len(shards), len(todo))
    for model_dir in todo.values():  # index and configs last: a model is complete once its config is written
        _write_model_files(model_dir, config, shards, shapes, itemsize)
    if todo:
        marker.write_text(json.dumps(params, indent=2) + "\n")

    n_params = sum(_numel(s) for s in shapes.values())
    return {
        "base": str(models["base"]),
        "experts": [str(models[f"expert_{i}"]) for i in range(n_experts)],
        "config": config,
        "n_params": n_params,
        "bytes_per_model": n_params * itemsize,
        "n_shards": len(shards),
        "written": sorted(todo),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 24, the real model's)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default="200MB")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = make_qwen2_05b_set(args.out_dir, n_experts=args.experts, dtype=args.dtype, layers=args.layers,
                              seed=args.seed, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    info.pop("config")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
