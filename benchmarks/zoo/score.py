"""Fast checks for the zoo: a teacher-forced scorer and in-memory merges of state dicts.

The scorer feeds prompt + reference answer + ``<|im_end|>`` once and takes the argmax at every answer
position. For an exact-match task, "every argmax equals the reference" holds exactly when greedy decoding
would produce the reference (the first wrong token is where greedy output would leave it), so the score
equals greedy exact match at one forward pass per item (ZOO_NOTES.md). For grounding the argmax tokens
are decoded and scored by IoU ≥ 0.5 with the evaluator's box parser: an approximation of greedy decoding
(each digit is predicted from the reference's earlier digits), reported as such. The product's evaluator
(``omnimerge.engine.evaluation``) is the generative one; these checks are for building and testing the zoo.

The in-memory merge applies the paper's Qwen2-VL policy (``engine/presets/qwen2_vl.yaml``): only the LLM's
2-D linear weights are merged, with a method from the algorithm registry; everything else stays at base.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from omnimerge.benchmarks.zoo.inputs import Conversation, build_inputs
from omnimerge.benchmarks.zoo.tasks import IMAGE_SIZE, make_sample, user_text

__all__ = [
    "TestItem",
    "TaskScores",
    "test_items",
    "read_test_items",
    "score_model",
    "merge_state_dicts",
    "MERGED_TENSOR",
]

# The Qwen2-VL preset's merge rule (engine/presets/qwen2_vl.yaml), for both module-name layouts.
MERGED_TENSOR = re.compile(
    r"^(model\.)?(language_model\.)?(model\.)?layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$"
)


@dataclass(frozen=True)
class TestItem:
    """One held-out item: what the model sees and what it is scored against."""

    task: str
    conversation: Conversation
    bbox: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class TaskScores:
    """Per-item hits (0/1) of one model on each task, with means and standard errors."""

    hits: Mapping[str, tuple[float, ...]]

    def mean(self, task: str) -> float:
        values = self.hits[task]
        return sum(values) / len(values)

    def stderr(self, task: str) -> float:
        values, m = self.hits[task], self.mean(task)
        return math.sqrt(max(m * (1 - m), 1e-12) / len(values))

    def average(self) -> float:
        """The five-task average (the paper's headline number)."""
        return sum(self.mean(t) for t in self.hits) / len(self.hits)

    def average_stderr(self) -> float:
        """Standard error of :meth:`average` (tasks independent)."""
        return math.sqrt(sum(self.stderr(t) ** 2 for t in self.hits)) / len(self.hits)

    def task_difference_stderr(self, other: "TaskScores", task: str) -> float:
        """Standard error of ``self.mean(task) - other.mean(task)`` on the same items: sd(a_i - b_i) / sqrt(n)."""
        diffs = [a - b for a, b in zip(self.hits[task], other.hits[task])]
        mean = sum(diffs) / len(diffs)
        return math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1) / len(diffs))

    def difference_stderr(self, other: "TaskScores") -> float:
        """Standard error of ``self.average() - other.average()`` on the same items (paired by item)."""
        return math.sqrt(sum(self.task_difference_stderr(other, t) ** 2 for t in self.hits)) / len(self.hits)

    def as_dict(self) -> dict[str, float]:
        return {**{t: round(self.mean(t), 4) for t in self.hits}, "average": round(self.average(), 4)}


def test_items(task: str, count: int, seed: int = 0) -> list[TestItem]:
    """The first ``count`` items of ``task``'s test stream, rendered in memory."""
    items = []
    for index in range(count):
        sample = make_sample(task, "test", index, seed)
        conversation = Conversation(sample.image, user_text(task, sample.question), sample.answer)
        items.append(TestItem(task, conversation, tuple(sample.bbox) if sample.bbox else None))
    return items


def read_test_items(zoo_dir: str | Path, task: str, limit: int | None = None) -> list[TestItem]:
    """Items of ``<zoo>/data/<task>/test.parquet`` (as the evaluator reads them), with training targets.

    The target is rebuilt from the row as the zoo formats answers: the choice letter for geometry, the
    Qwen2-VL box string for grounding, the answer itself otherwise.
    """
    import pyarrow.parquet as pq
    from PIL import Image

    from omnimerge.benchmarks.zoo.tasks import box_to_qwen

    table = pq.read_table(Path(zoo_dir) / "data" / task / "test.parquet")
    rows = table.to_pylist()[:limit]
    items = []
    for row in rows:
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        bbox = tuple(row["bbox"]) if task == "grounding" else None
        if task == "grounding":
            target = box_to_qwen(list(bbox), row["width"], row["height"])
        elif task == "geometry":
            target = "ABCD"[row["choices"].index(row["answers"][0])]
        else:
            target = row["answers"][0]
        items.append(TestItem(task, Conversation(image, user_text(task, row["question"]), target), bbox))
    return items


def _grounding_hit(text: str, bbox: tuple[float, float, float, float]) -> float:
    from omnimerge.engine.evaluation.boxes import box_iou, parse_box, xywh_to_xyxy

    parsed = parse_box(text, "qwen2vl", width=IMAGE_SIZE, height=IMAGE_SIZE)
    return float(parsed is not None and box_iou(parsed.box, xywh_to_xyxy(bbox)) >= 0.5)


def _hits(model: Any, tokenizer: Any, items: Sequence[TestItem], batch_size: int) -> list[float]:
    import torch

    from omnimerge.benchmarks.zoo.train import fast_vision

    hits: list[float] = []
    with torch.inference_mode(), fast_vision(model):
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch = build_inputs(tokenizer, [item.conversation for item in chunk])
            logits = model(**batch.model_kwargs).logits
            predicted = logits[:, :-1].argmax(-1)
            labels = batch.labels[:, 1:]
            for row, item in enumerate(chunk):
                mask = labels[row] != -100
                guess, gold = predicted[row][mask], labels[row][mask]
                if item.bbox is None:
                    hits.append(float(bool((guess == gold).all())))
                else:
                    hits.append(_grounding_hit(tokenizer.decode(guess.tolist()), item.bbox))
    return hits


def score_model(
    model: Any, tokenizer: Any, items: Mapping[str, Sequence[TestItem]], *, batch_size: int = 100
) -> TaskScores:
    """Teacher-forced scores of ``model`` on each task's items (module docstring for what they equal)."""
    model.eval()
    return TaskScores({task: tuple(_hits(model, tokenizer, task_items, batch_size)) for task, task_items in items.items()})


def merge_state_dicts(
    base: Mapping[str, Any],
    experts: Sequence[Mapping[str, Any]],
    method: str = "task_arithmetic",
    *,
    seed: int = 0,
    **params: Any,
) -> dict[str, Any]:
    """Merges full state dicts in memory with a registered method, under the paper's Qwen2-VL policy.

    Args:
        base: the base state dict.
        experts: expert state dicts with the base's keys and shapes.
        method: a name from ``omnimerge.algorithms`` (``task_arithmetic``, ``ties``, ...).
        seed: the merge seed (random methods draw from it and the tensor name).
        **params: the method's parameters, e.g. ``scale=0.5``.

    Returns:
        A new state dict: merged LLM linear weights, every other tensor the base's.
    """
    from omnimerge.algorithms.base import MergeContext
    from omnimerge.algorithms.registry import get_method

    spec = get_method(method)
    merged = {}
    for name, tensor in base.items():
        if not MERGED_TENSOR.match(name):
            merged[name] = tensor.clone()
            continue
        base_value = tensor.float()
        deltas = [expert[name].float() - base_value for expert in experts]
        ctx = MergeContext(tensor_name=name, seed=seed, expert_ids=tuple(f"expert{i}" for i in range(len(experts))))
        merged[name] = spec.fn(base_value, deltas, ctx=ctx, weights=None, **params).to(tensor.dtype)
    return merged

