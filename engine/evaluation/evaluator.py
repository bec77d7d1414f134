"""The built-in generative evaluator on ``transformers``.

A merged checkpoint inherits ``generation_config.json`` from its base, and Qwen2-VL's carries sampling
settings (``do_sample``, ``temperature=0.01``, ``top_k=1``, ``repetition_penalty=1.05``). The evaluator
therefore sets every decoding setting itself -- greedy, one beam, no repetition penalty, the task's
``max_new_tokens`` -- and records them beside the scores (EVALUATION.md, Generation). Prompts go through the
model's chat template; batches are left-padded so every row's generation starts at the same column.

A task feeds one modality (``TaskSpec.modality``): an image, a video (frames sampled evenly to the task's
``num_frames``, passed as ``videos=``) or an audio clip (resampled to the feature extractor's rate, passed as
``audio=`` with ``sampling_rate=``), each through the model's own processor. A task whose modality the model
cannot take is refused before any sample is read (``modalities``).

Each sample's prompt, prediction, references and score are saved, so :func:`rescore_predictions` can
recompute any task's value from the predictions file alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from omnimerge.engine.errors import EvaluationError

from .answers import LETTERS
from .data import Sample, iter_samples
from .loading import box_format_for, load_model_and_processor
from .media import prepare_sample_media
from .metrics import Reference, get_metric
from .results import ModelEntry, ResultsStore, read_predictions, result_row
from .suites import TaskSpec

__all__ = ["GREEDY", "EvalOptions", "TaskOutcome", "Evaluator", "evaluate_model", "rescore_predictions"]

logger = logging.getLogger(__name__)

# Decoding settings that override whatever generation_config.json the checkpoint carries.
# temperature / top_p / top_k are set to their neutral values so no sampling setting of the base survives.
GREEDY: dict[str, Any] = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "temperature": 1.0,
                          "top_p": 1.0, "top_k": 50, "length_penalty": 1.0, "no_repeat_ngram_size": 0}  # fmt: skip


@dataclass(frozen=True)
class EvalOptions:
    """How a model is evaluated (recorded in every result row's settings).

    Attributes:
        batch_size: Samples per ``generate`` call.
        device: ``cpu`` or ``cuda[:i]``; ``None`` picks ``cuda`` when available.
        dtype: Model dtype (``None``: the checkpoint's own).
        max_samples: Evaluate only the first N samples of each task (``None``: all).
    """

    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    max_samples: int | None = None

    def resolved_device(self) -> str:
        """``device``, or ``cuda`` when a GPU is visible, else ``cpu``."""
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class TaskOutcome:
    """One task's result: mean score, number of samples, time, settings and every sample's record."""

    value: float
    samples: int
    seconds: float
    settings: dict[str, Any]
    predictions: list[dict[str, Any]]


def _fill_prompt(task: TaskSpec, sample: Sample) -> str:
    template = task.prompt_with_choices if sample.choices and task.prompt_with_choices else task.prompt
    choices = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(sample.choices))
    return template.replace("{question}", sample.question).replace("{choices}", choices)


def _reference(record: dict[str, Any], box_format: str) -> Reference:
    resized = record.get("resized")
    return Reference(
        answers=tuple(record.get("answers") or ()),
        choices=tuple(record.get("choices") or ()),
        bbox=tuple(record["bbox"]) if record.get("bbox") is not None else None,
        width=record.get("width"),
        height=record.get("height"),
        resized=tuple(resized) if resized else None,
        box_format=box_format,
    )


def rescore_predictions(path: str | Path, metric: str | None = None, box_format: str | None = None) -> float:
    """Recompute a task's value from its predictions file alone.

    Args:
        path: ``predictions/<model>/<task>.jsonl``.
        metric: Metric to apply (default: the one recorded with each sample).
        box_format: Box format (default: the one recorded with each sample).

    Returns:
        Mean score over the samples (0 for an empty file).
    """
    records = read_predictions(path)
    if not records:
        return 0.0
    total = 0.0
    for record in records:
        spec = get_metric(metric or record["metric"])
        total += spec.fn(record["prediction"], _reference(record, box_format or record["box_format"])).score
    return total / len(records)


def _batches(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Evaluator:
    """A loaded model and processor that answers prompts greedily and scores tasks.

    Args:
        model_path: Checkpoint directory.
        options: Batch size, device, dtype, sample limit.
    """

    def __init__(self, model_path: str | Path, options: EvalOptions = EvalOptions()) -> None:
        self.model_path = str(model_path)
        self.options = options
        self.device = options.resolved_device()
        started = time.perf_counter()
        self.model, self.processor = load_model_and_processor(model_path, device=self.device, dtype=options.dtype)
        self.load_seconds = time.perf_counter() - started
        self.model_type = str(self.model.config.model_type)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if not getattr(self.processor, "chat_template", None) and not getattr(self.tokenizer, "chat_template", None):
            raise EvaluationError(
                f"Model '{model_path}' has no chat template; save one with it (chat_template.jinja) so prompts "
                "can be built as the model was trained."
            )

    def generation_settings(self, max_new_tokens: int) -> dict[str, Any]:
        """The decoding settings of one task: ``GREEDY`` plus ``max_new_tokens`` and the stop/pad ids."""
        base = self.model.generation_config
        pad = base.pad_token_id if base.pad_token_id is not None else self.tokenizer.pad_token_id
        return {**GREEDY, "max_new_tokens": int(max_new_tokens), "eos_token_id": base.eos_token_id,
                "pad_token_id": pad}  # fmt: skip

    @property
    def sampling_rate(self) -> int | None:
        """The audio rate the processor's feature extractor takes (``None``: the model takes no audio)."""
        processor = self.processor
        extractor = getattr(processor, "feature_extractor", None) or getattr(processor, "audio_processor", None)
        rate = getattr(extractor, "sampling_rate", None)
        return int(rate) if rate else None

    def _chat_text(self, prompt: str, image: Any, video: Any, audio: Any) -> str:
        content: list[dict[str, Any]] = [{"type": "image"}] if image is not None else []
        if video is not None:
            content.append({"type": "video"})
        if audio is not None:  # Qwen2-Audio-Instruct's template tests for an 'audio' key, not the type
            content.append({"type": "audio", "audio": "<waveform>"})
        content.append({"type": "text", "text": prompt})
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)  # fmt: skip
        for kind, given in (("video", video), ("audio", audio)):
            token = getattr(self.processor, f"{kind}_token", None)
            if given is not None and token and token not in text:
                raise EvaluationError(
                    f"The chat template of model '{self.model_path}' wrote no {kind} placeholder ('{token}') for a "
                    f"{{'type': '{kind}'}} message part; save the model's own chat template with it."
                )
        return text

    def model_inputs(
        self,
        prompts: Sequence[str],
        images: Sequence[Any],
        *,
        videos: Sequence[Any] | None = None,
        audios: Sequence[Any] | None = None,
    ) -> Any:
        """The processor's output for a batch: chat-templated, left-padded texts with each sample's media.

        Args:
            prompts: User texts.
            images: PIL images, one per prompt (``None`` for a sample without one).
            videos: Per prompt, a video as a list of PIL frames (``None``: no video); passed as ``videos=``.
            audios: Per prompt, a mono float32 waveform at :attr:`sampling_rate` (``None``: no audio); passed as
                ``audio=`` with ``sampling_rate=``.

        Returns:
            The ``BatchFeature`` (on the CPU): ``input_ids``, ``attention_mask`` and the media tensors.
        """
        videos = list(videos) if videos is not None else [None] * len(prompts)
        audios = list(audios) if audios is not None else [None] * len(prompts)
        texts = [self._chat_text(*parts) for parts in zip(prompts, images, videos, audios)]
        present = [image for image in images if image is not None]
        media: dict[str, Any] = {}
        if any(v is not None for v in videos):
            media["videos"] = [v for v in videos if v is not None]
        if any(a is not None for a in audios):
            media.update(audio=[a for a in audios if a is not None], sampling_rate=self.sampling_rate)
        return self.processor(text=texts, images=present or None, padding=True, return_tensors="pt", **media)

    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[Any],
        *,
        max_new_tokens: int,
        videos: Sequence[Any] | None = None,
        audios: Sequence[Any] | None = None,
    ) -> tuple[list[str], list[Any]]:
        """Answer a batch of prompts greedily, each with its image, video or audio (or none of them).

        Args:
            prompts, images, videos, audios: As :meth:`model_inputs`.
            max_new_tokens: Generation length limit.

        Returns:
            The decoded answers (special tokens skipped) and, per sample, the ``(width, height)`` of the image
            as the processor resized it (``None`` when unknown).
        """
        import torch
        from transformers import GenerationConfig

        inputs = self.model_inputs(prompts, images, videos=videos, audios=audios)
        resized = self._resized_sizes(inputs, images)
        inputs = inputs.to(self.device)
        config = GenerationConfig(**self.generation_settings(max_new_tokens))
        with torch.inference_mode():
            output = self.model.generate(**inputs, generation_config=config)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [a.strip() for a in answers], resized

    def _resized_sizes(self, inputs: Any, images: Sequence[Any]) -> list[Any]:
        grid = inputs.get("image_grid_thw")
        patch = getattr(getattr(self.processor, "image_processor", None), "patch_size", None)
        sizes: list[Any] = []
        k = 0
        for image in images:
            if image is None or grid is None or patch is None:
                sizes.append(None)
                continue
            _, h, w = (int(v) for v in grid[k])
            sizes.append([w * patch, h * patch])
            k += 1
        return sizes

    def run_task(self, task: TaskSpec, data_root: str | Path | None) -> TaskOutcome:
        """Generate and score every sample of one task (up to ``options.max_samples``).

        Raises:
            EvaluationError: The model cannot take the task's modality, or a sample lacks its input.
        """
        from .modalities import check_task_modality

        check_task_modality(task, self.model_path, self.processor)
        metric = get_metric(task.metric)
        box_format = box_format_for(self.model_type) if task.box_format == "model" else task.box_format
        started = time.perf_counter()
        records: list[dict[str, Any]] = []
        samples = iter_samples(task, data_root, limit=self.options.max_samples)
        for batch in _batches(samples, self.options.batch_size):
            media = [prepare_sample_media(task, s, self.sampling_rate) for s in batch]
            images, videos, audios = ([m[k] for m in media] for k in range(3))
            prompts = [_fill_prompt(task, s) for s in batch]
            answers, resized = self.generate(prompts, images, max_new_tokens=task.max_new_tokens,
                                             videos=videos if task.modality == "video" else None,
                                             audios=audios if task.modality == "audio" else None)  # fmt: skip
            for sample, (image, video, _, info), prompt, answer, size in zip(batch, media, prompts, answers, resized):
                shown = image if image is not None else (video[0] if video else None)
                record = {
                    "question_id": sample.question_id,
                    "category": sample.category,
                    "prompt": prompt,
                    "prediction": answer,
                    "answers": list(sample.answers),
                    "choices": list(sample.choices),
                    "bbox": list(sample.bbox) if sample.bbox is not None else None,
                    "width": sample.width if sample.width is not None else (shown.width if shown else None),
                    "height": sample.height if sample.height is not None else (shown.height if shown else None),
                    "resized": size,
                    "metric": metric.name,
                    "box_format": box_format,
                    "modality": task.modality,
                    **info,
                }
                scored = metric.fn(answer, _reference(record, box_format))
                record.update(score=scored.score, extracted=scored.extracted)
                records.append(record)
        seconds = time.perf_counter() - started
        value = sum(r["score"] for r in records) / len(records) if records else 0.0
        return TaskOutcome(value, len(records), seconds, self._task_settings(task, box_format), records)

    def _task_settings(self, task: TaskSpec, box_format: str) -> dict[str, Any]:
        import torch
        import transformers

        return {
            "generation": self.generation_settings(task.max_new_tokens),
            "prompt": task.prompt,
            "prompt_with_choices": task.prompt_with_choices,
            "dataset": task.dataset,
            "split": task.split,
            "data_path": task.path,
            "filter": dict(task.filter) if task.filter else None,
            "box_format": box_format,
            "modality": task.modality,
            **({"num_frames": task.num_frames} if task.modality == "video" else {}),
            **({"sampling_rate": self.sampling_rate} if task.modality == "audio" else {}),
            "chat_template": True,
            "padding_side": self.tokenizer.padding_side,
            "model_path": self.model_path,
            "model_type": self.model_type,
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "device": self.device,
            **{k: v for k, v in asdict(self.options).items() if k not in ("device", "dtype")},
            "backend": "builtin",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }


def evaluate_model(
    entry: ModelEntry,
    tasks: Sequence[TaskSpec],
    *,
    data_root: str | Path | None,
    results_dir: str | Path,
    options: EvalOptions = EvalOptions(),
    suite_name: str = "",
    on_task_done: Callable[[str, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Load one model once and run each of its tasks, recording each as soon as it is done.

    This is the unit of work of both executors (``cluster.evaluate``): it is idempotent, and a task already
    finished in ``results_dir`` is skipped, so a retried worker resumes where the dead one stopped.

    Args:
        entry: The model.
        tasks: Tasks to run.
        data_root: Folder the tasks' relative data paths live under.
        results_dir: Results directory (``results.ResultsStore``).
        options: Batch size, device, dtype, sample limit.
        suite_name: Recorded in the settings.
        on_task_done: Called with ``(model, task)`` after each task is recorded.

    Returns:
        The result rows of the tasks run now.
    """
    store = ResultsStore(results_dir)
    done = store.scored_pairs()
    pending = [t for t in tasks if (entry.name, t.name) not in done]
    if not pending:
        return []
    evaluator = Evaluator(entry.path, options)
    logger.info("%s: loaded in %.1f s; %d task(s) to run", entry.name, evaluator.load_seconds, len(pending))
    rows = []
    for task in pending:
        outcome = evaluator.run_task(task, data_root)
        settings = {**outcome.settings, "suite": suite_name, "load_seconds": round(evaluator.load_seconds, 3)}
        row = result_row(entry, task=task.name, capability=task.capability, metric=task.metric, value=outcome.value,
                         samples=outcome.samples, settings=settings, seconds=outcome.seconds)  # fmt: skip
        store.record_task(entry.name, task.name, [row], outcome.predictions)
        rows.append(row)
        logger.info("%s / %s: %s = %.4f over %d samples", entry.name, task.name, task.metric, outcome.value,
                    outcome.samples)  # fmt: skip
        if on_task_done is not None:
            on_task_done(entry.name, task.name)
    return rows
