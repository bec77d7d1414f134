"""Model inputs for the zoo's training and fast scoring, built without ``Qwen2VLProcessor``.

``Qwen2VLProcessor`` cannot be constructed without torchvision (its video processor), and running the
image processor per item costs more than a training step's worth of time per batch. This module builds
exactly what the processor would (checked in ``tests/test_zoo.py``): the chat template with 16
``<|image_pad|>`` tokens per image, ``mm_token_type_ids``, and ``pixel_values`` patchified in Qwen2-VL's
order, vectorised over the batch. Evaluation proper goes through the real processor (engine.evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from omnimerge.benchmarks.zoo.tasks import IMAGE_SIZE

__all__ = ["Conversation", "ZooInputs", "pixel_values", "build_inputs", "IMAGE_TOKENS"]

PATCH, MERGE, TEMPORAL = 14, 2, 2
GRID = IMAGE_SIZE // PATCH
IMAGE_TOKENS = (GRID // MERGE) ** 2
# OPENAI_CLIP_MEAN / STD, as Qwen2VLImageProcessor normalises.
_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass(frozen=True)
class Conversation:
    """One single-turn item: an image, the user's text, and (for training/scoring) the answer."""

    image: Any
    user: str
    answer: str = ""


@dataclass
class ZooInputs:
    """A padded batch: model keyword arguments plus where each answer sits."""

    model_kwargs: dict[str, Any]
    labels: Any  # (batch, seq) answer tokens and the closing <|im_end|>, -100 elsewhere


def pixel_values(images: Sequence[Any]) -> Any:
    """``Qwen2VLImageProcessor`` output for 112×112 RGB images: (16·4·batch, 3·2·14·14) float32.

    The processor's resize is the identity at this size, so this is rescale, normalise and patchify
    (grid → merge blocks → channel → temporal copy → patch rows → patch columns).
    """
    import torch

    arrays = np.stack([np.asarray(image.convert("RGB")) for image in images])
    if arrays.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"zoo images are {IMAGE_SIZE}×{IMAGE_SIZE}; got {arrays.shape[1:3]}")
    x = torch.from_numpy(arrays).to(torch.float32)
    x = (x / 255.0 - torch.from_numpy(_MEAN)) / torch.from_numpy(_STD)  # (B, H, W, C)
    b, half = x.shape[0], GRID // MERGE
    x = x.permute(0, 3, 1, 2).reshape(b, 3, half, MERGE, PATCH, half, MERGE, PATCH)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, gh, gw, mh, mw, C, ph, pw)
    x = x.unsqueeze(6).expand(*x.shape[:6], TEMPORAL, PATCH, PATCH)
    return x.reshape(b * GRID * GRID, 3 * TEMPORAL * PATCH * PATCH)


@lru_cache(maxsize=4096)
def _prompt_ids(tokenizer: Any, user: str) -> tuple[int, ...]:
    # Rendering the Jinja chat template costs ~0.5 ms and the prompts repeat, so they are cached.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * IMAGE_TOKENS)
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_inputs(tokenizer: Any, items: Sequence[Conversation], *, with_answers: bool = True) -> ZooInputs:
    """Tokenises a batch (right padding) and returns model kwargs and answer labels.

    Args:
        tokenizer: the zoo tokenizer.
        items: conversations; their answers are appended (with ``<|im_end|>``) when ``with_answers``.
        with_answers: False for prompts only (labels are then all -100).
    """
    import torch

    prompts = [list(_prompt_ids(tokenizer, item.user)) for item in items]
    answers = [
        tokenizer(item.answer + "<|im_end|>", add_special_tokens=False)["input_ids"] if with_answers else []
        for item in items
    ]
    length = max(len(p) + len(a) for p, a in zip(prompts, answers))
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(items), length), pad, dtype=torch.long)
    attention = torch.zeros((len(items), length), dtype=torch.long)
    labels = torch.full((len(items), length), -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids = prompt + answer
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        if answer:
            labels[row, len(prompt) : len(ids)] = torch.tensor(answer)
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "pixel_values": pixel_values([item.image for item in items]),
        "image_grid_thw": torch.tensor([[1, GRID, GRID]] * len(items), dtype=torch.long),
        "mm_token_type_ids": (input_ids == image_pad).to(torch.int32),
    }
    return ZooInputs(kwargs, labels)
