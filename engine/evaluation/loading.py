"""Load a multimodal checkpoint and its processor for generation, tolerating a missing video processor.

``AutoProcessor`` builds every sub-processor a model family declares. Qwen2-VL's (and Qwen2.5-VL's,
InternVL's) video processor needs torchvision; without it the whole processor fails although images and text
need nothing of it. :func:`load_model_and_processor` then builds the family's processor from its image
processor and tokenizer alone (ZOO_NOTES.md). Remote code is never run.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from omnimerge.engine.errors import EvaluationError

__all__ = ["load_model_and_processor", "load_processor", "box_format_for", "MODEL_BOX_FORMATS"]

logger = logging.getLogger(__name__)

# config.model_type -> how that family writes boxes (boxes.BOX_FORMATS).
MODEL_BOX_FORMATS = {
    "qwen2_vl": "qwen2vl",
    "qwen2_5_vl": "qwen2.5vl",
    "internvl": "internvl",
    "internvl_chat": "internvl",
}


def box_format_for(model_type: str) -> str:
    """The box format of a model family (``auto`` for families without a known one)."""
    return MODEL_BOX_FORMATS.get(model_type, "auto")


class _WithoutVideoProcessor:
    """Mixin for a ``ProcessorMixin`` subclass: accept ``video_processor=None`` instead of failing."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument is None and argument_name == "video_processor":
            return None
        return super().check_argument_for_proper_class(argument_name, argument)  # type: ignore[misc]


@lru_cache(maxsize=None)
def _image_only_class(processor_class: type) -> type:
    return type(f"{processor_class.__name__}ImageOnly", (_WithoutVideoProcessor, processor_class), {})


def _chat_template(path: Path, tokenizer: Any) -> str | None:
    import json

    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return None


def load_processor(path: str | Path, model_type: str) -> Any:
    """The checkpoint's processor: ``AutoProcessor``, else the family's processor without a video processor.

    The tokenizer pads on the left (batched generation).

    Raises:
        EvaluationError: Neither way works; the message carries both reasons.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    path = Path(path)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (ImportError, OSError, ValueError, TypeError, AttributeError) as auto_error:
        class_name = PROCESSOR_MAPPING_NAMES.get(model_type)
        processor_class = getattr(transformers, class_name, None) if class_name else None
        if processor_class is None:
            raise EvaluationError(
                f"Processor of model '{path}' cannot be loaded ({auto_error}); model type '{model_type}' has no "
                "known processor class. Save the processor files (preprocessor_config.json, tokenizer) with it."
            ) from auto_error
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            image_processor = AutoImageProcessor.from_pretrained(path)
            kwargs: dict[str, Any] = {"image_processor": image_processor, "tokenizer": tokenizer}
            if "video_processor" in processor_class.get_attributes():
                kwargs["video_processor"] = None
            processor = _image_only_class(processor_class)(**kwargs, chat_template=_chat_template(path, tokenizer))
        except (ImportError, OSError, ValueError, TypeError, AttributeError) as error:
            raise EvaluationError(
                f"Processor of model '{path}' cannot be loaded: AutoProcessor said '{auto_error}', and building "
                f"{class_name} from its image processor and tokenizer said '{error}'. Check the processor files."
            ) from error
        reason = str(auto_error).strip().splitlines()[0] if str(auto_error).strip() else type(auto_error).__name__
        logger.info("%s: AutoProcessor failed (%s); using %s without a video processor", path, reason, class_name)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    return processor


def load_model_and_processor(path: str | Path, device: str = "cpu", dtype: str | None = None) -> tuple[Any, Any]:
    """Load a checkpoint directory for generation: the model (eval mode, on ``device``) and its processor.

    Args:
        path: A Hugging Face checkpoint directory (``config.json``, weights, tokenizer, processor files).
        device: ``cpu``, ``cuda``, ``cuda:1``, ...
        dtype: ``float32``, ``bfloat16``, ``float16``; ``None`` keeps the checkpoint's own dtype.

    Returns:
        ``(model, processor)``; ``model.config.model_type`` names the family.

    Raises:
        EvaluationError: The directory is not a loadable checkpoint (the message says what is missing).
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise EvaluationError(
            f"Model '{path}' has no config.json; give a Hugging Face checkpoint directory (a merged output, a "
            "zoo model, or a downloaded hub snapshot)."
        )
    config = AutoConfig.from_pretrained(path)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    model_class = model_class or AutoModelForImageTextToText
    torch_dtype: Any = "auto" if dtype is None else getattr(torch, dtype, None)
    if torch_dtype is None:
        raise EvaluationError(f"Unknown dtype '{dtype}' for model '{path}'; use float32, bfloat16 or float16.")
    try:
        model = model_class.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as error:
        raise EvaluationError(f"Model '{path}' does not load with {model_class.__name__}: {error}") from error
    model.to(device).eval()
    return model, load_processor(path, config.model_type)
