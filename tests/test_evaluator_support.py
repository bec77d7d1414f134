"""Shared helpers for the evaluation tests (no tests here): tiny task data and a tiny real Qwen2-VL."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

from PIL import Image

from omnimerge.engine.evaluation.suites import Suite, parse_suite

QUESTIONS = (
    "what colour is the circle ?",
    "how many",
    "is there a red square in the top left of the image ?",
    "what shape",
    "which bar is the tallest ?",
    "what number is written ?",
)


def png_bytes(seed: int, size: tuple[int, int] = (112, 112)) -> bytes:
    """A deterministic noise image, PNG-encoded."""
    rng = random.Random(seed)
    image = Image.new("RGB", size)
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def task_rows(n: int, *, grounding: bool = False) -> list[dict[str, Any]]:
    """Rows in the zoo's layout: question_id, image struct, question (varied lengths), answers[, bbox]."""
    rows = []
    for i in range(n):
        row: dict[str, Any] = {
            "question_id": f"q{i}",
            "image": {"bytes": png_bytes(i), "path": None},
            "question": QUESTIONS[i % len(QUESTIONS)],
            "answers": ["red", "red", "blue"] if i % 2 else ["3"],
            "category": "even" if i % 2 == 0 else "odd",
        }
        if grounding:
            row.update(question=f"the shape number {i}", bbox=[10.0 + i, 20.0, 40.0, 30.0], width=112, height=112)
        rows.append(row)
    return rows


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def make_task_data(root: Path, n: int = 6) -> Path:
    """``root/vqa/test.parquet`` and ``root/ground/test.parquet``; returns ``root``."""
    write_parquet(root / "vqa" / "test.parquet", task_rows(n))
    write_parquet(root / "ground" / "test.parquet", task_rows(n, grounding=True))
    return root


def tiny_suite(max_new_tokens: int = 5) -> Suite:
    """Two tasks over :func:`make_task_data`: short-answer VQA and Qwen2-VL grounding."""
    return parse_suite(
        {
            "name": "tiny",
            "tasks": [
                {"name": "vqa", "capability": "VQA", "path": "vqa", "metric": "vqa_accuracy",
                 "max_new_tokens": max_new_tokens},
                {"name": "ground", "capability": "Grounding", "path": "ground", "metric": "grounding_accuracy",
                 "prompt": "Output the bounding box of {question}.", "max_new_tokens": max_new_tokens + 3},
            ],
        }
    )  # fmt: skip


def build_model(out_dir: Path, seed: int = 0) -> Path:
    """The zoo's tiny random Qwen2-VL (model, tokenizer, processor config, chat template)."""
    from omnimerge.benchmarks.zoo.modeling import build_tiny_base

    return build_tiny_base(out_dir, seed=seed)
