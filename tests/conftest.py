"""Shared fixtures: tiny real checkpoints built once per test session (transformers configs, real files)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py importable as `tiny_models`

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Qwen2-VL and LLaVA bases (sharded into several files) with full-weight experts and a LoRA expert."""
    from tiny_models import build_tiny_llava, build_tiny_qwen2vl, make_expert, make_lora_adapter

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_qwen2vl(root / "qwen_base", seed=0)
    for i in range(3):
        make_expert(root / "qwen_base", root / f"qwen_e{i}", seed=i + 1, noise=0.02)
    make_lora_adapter(root / "qwen_base", root / "qwen_lora", seed=7, r=4, alpha=8,
                      target_modules=("q_proj", "v_proj", "down_proj"))
    build_tiny_llava(root / "llava_base", seed=0)
    for i in range(2):
        make_expert(root / "llava_base", root / f"llava_e{i}", seed=i + 11, noise=0.02)
    return root
