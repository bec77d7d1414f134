"""Which inputs -- image, video, audio -- a model takes, and the errors for a task it cannot take.

Two checks, each naming the model, the task and the fix:

- before any model is loaded (the dispatcher, ``cluster.evaluate``), from ``config.json``: the keys in
  ``MODALITY_CONFIG_KEYS`` show what a family takes (LLaVA: image; Video-LLaVA and Qwen2-VL: image and video;
  Qwen2-Audio: audio). A config with none of them is not judged here;
- when a task starts (``Evaluator.run_task``), from the loaded processor as well: a family that takes video
  but whose processor was built without a video processor (torchvision missing, ``loading``) is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from omnimerge.engine.errors import EvaluationError

from .media import MODALITIES

__all__ = [
    "MODALITY_CONFIG_KEYS",
    "config_modalities",
    "processor_modalities",
    "model_modalities",
    "modality_problems",
    "check_task_modality",
    "MODALITY_FIX",
]

# config.json keys whose presence shows that a model family takes a modality (architecture knowledge as data).
MODALITY_CONFIG_KEYS: Mapping[str, tuple[str, ...]] = {
    "image": ("vision_config",),
    "video": ("video_token_index", "video_token_id"),
    "audio": ("audio_config",),
}
MODALITY_FIX = ("Evaluate each model on its own modality's tasks: one suite per model (`omnimerge modality RECIPE "
                "--eval-suite NAME=SUITE`, or one `omnimerge eval` per suite).")  # fmt: skip


def config_modalities(config: Mapping[str, Any]) -> tuple[str, ...]:
    """Modalities a ``config.json`` shows (``MODALITY_CONFIG_KEYS``), in ``MODALITIES`` order; ``()``: unknown."""
    return tuple(m for m in MODALITIES if any(config.get(k) is not None for k in MODALITY_CONFIG_KEYS[m]))


def processor_modalities(processor: Any) -> tuple[str, ...]:
    """Modalities a loaded processor can prepare: an image processor, a video processor, an audio feature extractor."""
    has = {
        "image": getattr(processor, "image_processor", None) is not None,
        "video": getattr(processor, "video_processor", None) is not None,
        "audio": (getattr(processor, "feature_extractor", None) or getattr(processor, "audio_processor", None))
        is not None,
    }
    return tuple(m for m in MODALITIES if has[m])


def _read_config(path: str | Path) -> dict[str, Any] | None:
    config_path = Path(path).expanduser() / "config.json"
    if not config_path.is_file():
        return None
    try:
        return json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None


def _architecture(config: Mapping[str, Any]) -> str:
    return str((config.get("architectures") or [config.get("model_type", "?")])[0])


def model_modalities(path: str | Path) -> tuple[str, ...]:
    """Modalities of the checkpoint at ``path`` by its ``config.json`` (``()``: none found or no config)."""
    config = _read_config(path)
    return config_modalities(config) if config else ()


def modality_problems(pairs: Iterable[tuple[Any, Sequence[Any]]]) -> list[str]:
    """One line per (model, task) whose task feeds an input the model's config shows it cannot take.

    Args:
        pairs: ``(ModelEntry, tasks)``; each task has ``name`` and ``modality``.
    """
    problems = []
    for entry, tasks in pairs:
        config = _read_config(entry.path)
        takes = config_modalities(config) if config else ()
        if not takes:
            continue
        for task in tasks:
            if task.modality not in takes:
                problems.append(
                    f"model '{entry.name}' ({_architecture(config)}, takes {' and '.join(takes)}) cannot take task "
                    f"'{task.name}' ({task.modality})"
                )
    return problems


def _torchvision_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is None


def check_task_modality(task: Any, model_path: str | Path, processor: Any) -> None:
    """Refuse a task whose modality the loaded model cannot take (module docstring).

    Args:
        task: The task (``name``, ``modality``).
        model_path: The checkpoint directory (its ``config.json`` is read).
        processor: The model's loaded processor.

    Raises:
        EvaluationError: The model's family does not take the task's input, or its processor cannot prepare it.
    """
    config = _read_config(model_path) or {}
    by_config = config_modalities(config)
    by_processor = processor_modalities(processor)
    if by_config and task.modality not in by_config:
        raise EvaluationError(
            f"Task '{task.name}' feeds {task.modality}, but model '{model_path}' ({_architecture(config)}) takes "
            f"{' and '.join(by_config)} only. {MODALITY_FIX}"
        )
    if task.modality in by_processor:
        return
    if task.modality == "video" and _torchvision_missing():
        reason = ("transformers builds this family's video processor with torchvision, which is not installed. "
                  "Install torchvision to evaluate video")  # fmt: skip
    else:
        reason = f"its processor files hold no {task.modality} processor. Save them with the model"
    raise EvaluationError(
        f"Task '{task.name}' feeds {task.modality}, but the processor of model '{model_path}' "
        f"({_architecture(config)}) has no {task.modality} processor: {reason}, or evaluate this model on its "
        f"{' and '.join(m for m in by_processor if m in (by_config or MODALITIES)) or 'other'} tasks."
    )
