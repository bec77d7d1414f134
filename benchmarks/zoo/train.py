"""Training for the zoo: pre-training the base, then full and LoRA expert fine-tunes.

- Pre-training: captions of every task's kind of image (``Describe the image.``), with a small share of
  task-style QA from a separate stream mixed in, so the base answers in each task's format, poorly
  (ZOO_NOTES.md: a caption-only base made merging fail).
- Experts: fine-tuned from the base on one task's ``train`` stream at a small learning rate for few
  steps — weak experts with small task vectors merge better (ZOO_NOTES.md; the paper's Theorem 3.1).
- LoRA experts: ``peft`` rank-8 adapters on the LLM's q,k,v,o,gate,up,down projections (the paper's
  Qwen2-VL family), saved with ``save_pretrained``.

Two CPU speed-ups are applied while training and removed before saving, so checkpoints stay standard
Qwen2-VL (:func:`fast_vision`): the Conv3d patch embedding runs as the equivalent linear map, and vision
attention runs batched over images (all zoo images have the same number of patches).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from omnimerge.benchmarks.zoo.inputs import Conversation, ZooInputs, build_inputs
from omnimerge.benchmarks.zoo.tasks import TASKS, make_caption_sample, make_object_caption_sample, make_sample, user_text

__all__ = [
    "Schedule",
    "LORA_TARGETS",
    "fast_vision",
    "pretrain_batches",
    "task_batches",
    "train_steps",
    "answer_loss",
    "lora_model",
    "train_only_merged_weights",
]

logger = logging.getLogger(__name__)

# Share of each task's images among pre-training captions: reading glyphs is learnt slowest, so OCR gets more.
PRETRAIN_WEIGHTS = {"vqa": 1.0, "geometry": 1.0, "chart": 1.0, "ocr": 2.0, "grounding": 1.0}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Schedule:
    """An optimisation schedule: AdamW, linear warm-up, cosine decay to ``final_fraction`` of ``lr``."""

    steps: int
    lr: float
    batch_size: int = 32
    warmup: int = 0
    final_fraction: float = 1.0
    weight_decay: float = 0.0
    clip: float = 1.0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.final_fraction + (1 - self.final_fraction) * cosine)


def _linear_patch_embed(self: Any, hidden_states: Any) -> Any:
    import torch.nn.functional as F

    weight = self.proj.weight
    return F.linear(hidden_states.to(weight.dtype).reshape(-1, weight[0].numel()), weight.reshape(weight.shape[0], -1))


def _batched_vision_attention(
    self: Any, hidden_states: Any, cu_seqlens: Any, position_embeddings: Any = None, max_seqlen: Any = None, **kwargs: Any
) -> Any:
    import torch.nn.functional as F
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    seq = hidden_states.shape[0]
    images = cu_seqlens.numel() - 1
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.reshape(images, seq // images, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    return self.proj(out.transpose(1, 2).reshape(seq, -1))


@contextlib.contextmanager
def fast_vision(model: Any) -> Iterator[Any]:
    """Runs ``model``'s vision tower with the two CPU speed-ups, restoring the stock forwards on exit.

    Both are exact rewrites for equal-sized images: a Conv3d whose kernel equals its stride is a linear
    map on flattened patches, and equal-length images need no per-image attention loop.
    """
    visual = model.model.visual
    wanted = [(visual.patch_embed, _linear_patch_embed)] + [(block.attn, _batched_vision_attention) for block in visual.blocks]
    patched = [(module, forward) for module, forward in wanted if "forward" not in vars(module)]  # re-entrant
    for module, forward in patched:
        module.forward = types.MethodType(forward, module)
    try:
        yield model
    finally:
        for module, _ in patched:
            del module.forward  # back to the class's forward


def _as_conversation(task: str, sample: Any) -> Conversation:
    return Conversation(sample.image, user_text(task, sample.question), sample.answer)


def pretrain_batches(
    seed: int, batch_size: int, qa_fraction: float, object_fraction: float = 0.0
) -> Iterator[list[Conversation]]:
    """Endless pre-training batches: captions of all five kinds of image, ``qa_fraction`` task QA, and
    ``object_fraction`` single-object warm-up captions (:func:`tasks.make_object_caption_sample`)."""
    rng = random.Random(f"omnimerge-zoo/{seed}/pretrain-mix")
    counters = {task: 0 for task in TASKS}
    qa_counters = {task: 0 for task in TASKS}
    objects = 0
    while True:
        batch = []
        for _ in range(batch_size):
            task = rng.choices(TASKS, weights=[PRETRAIN_WEIGHTS[t] for t in TASKS])[0]
            draw = rng.random()
            if draw < object_fraction:
                sample = make_object_caption_sample(objects, seed)
                batch.append(Conversation(sample.image, sample.question, sample.answer))
                objects += 1
            elif draw < object_fraction + qa_fraction:
                batch.append(_as_conversation(task, make_sample(task, "pretrain-qa", qa_counters[task], seed)))
                qa_counters[task] += 1
            else:
                sample = make_caption_sample(task, counters[task], seed)
                batch.append(Conversation(sample.image, sample.question, sample.answer))
                counters[task] += 1
        yield batch


def task_batches(task: str, seed: int, batch_size: int) -> Iterator[list[Conversation]]:
    """Endless batches of ``task``'s ``train`` stream (never the test stream)."""
    index = 0
    while True:
        yield [_as_conversation(task, make_sample(task, "train", index + i, seed)) for i in range(batch_size)]
        index += batch_size


def answer_loss(model: Any, batch: ZooInputs) -> Any:
    """Mean next-token cross-entropy over the answer tokens, as ``model(..., labels=...).loss`` computes it.

    Only the positions that predict an answer token go through ``lm_head`` (about a fifth of them), which
    saves the rest of the head's forward and backward; the loss is the same.
    """
    import torch.nn.functional as F

    hidden = model.model(**batch.model_kwargs).last_hidden_state[:, :-1]
    labels = batch.labels[:, 1:]
    scored = labels != -100
    return F.cross_entropy(model.lm_head(hidden[scored]).float(), labels[scored])


def train_steps(
    model: Any,
    tokenizer: Any,
    batches: Iterator[list[Conversation]],
    schedule: Schedule,
    *,
    seed: int,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Trains the parameters of ``model`` that require grad for ``schedule.steps`` steps.

    Args:
        model: a Qwen2-VL model (or a peft wrapper of one).
        tokenizer: the zoo tokenizer.
        batches: an iterator of conversation batches.
        schedule: optimiser settings.
        seed: seeds torch (dropout-free models make this only matter for peft init done before).
        progress: called as ``progress(step, steps, loss)`` every 25 steps.

    Returns:
        The loss of every step.
    """
    import torch

    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay, betas=(0.9, 0.98))
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    losses = []
    model.train()
    started = time.perf_counter()
    with fast_vision(base_model):
        for step in range(schedule.steps):
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(step)
            batch = build_inputs(tokenizer, next(batches))
            loss = answer_loss(base_model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, schedule.clip)
            optimizer.step()
            losses.append(loss.item())
            if progress is not None and ((step + 1) % 25 == 0 or step + 1 == schedule.steps):
                progress(step + 1, schedule.steps, sum(losses[-25:]) / len(losses[-25:]))
    model.eval()
    logger.debug("%d steps in %.1f s", schedule.steps, time.perf_counter() - started)
    return losses


def lora_model(model: Any, *, rank: int = 8, alpha: int = 16, seed: int = 0) -> Any:
    """Wraps ``model`` with rank-``rank`` LoRA adapters on the LLM's projections (vision stays frozen)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none")
    return get_peft_model(model, config)


def train_only_merged_weights(model: Any) -> int:
    """Freezes everything but the LLM's 2-D linear weights (what the paper's Qwen2-VL policy merges).

    Full-fine-tuning experts then move exactly the tensors a merge combines; the vision tower, projector,
    embeddings, ``lm_head``, norms and biases stay at the base's values. Returns the trainable count.
    """
    from omnimerge.benchmarks.zoo.score import MERGED_TENSOR

    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(bool(MERGED_TENSOR.match(name)))
        count += param.numel() if param.requires_grad else 0
    return count
