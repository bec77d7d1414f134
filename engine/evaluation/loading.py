"""Load a multimodal checkpoint and its processor for generation, tolerating a missing video processor.

``AutoProcessor`` builds every sub-processor a model family declares. In ``transformers`` 5 every video
processor (Qwen2-VL's, Qwen2.5-VL's, InternVL's, Video-LLaVA's) needs torchvision; without it the whole
processor fails although images and text need nothing of it. :func:`load_model_and_processor` then builds the
family's processor from its image processor and tokenizer (ZOO_NOTES.md), and

- for families whose video processor treats each frame as an image (``FRAME_VIDEO_FAMILIES``: Video-LLaVA,
  whose ``VideoLlavaVideoProcessor`` has the image processor's CLIP resize, centre crop, rescale and
  normalisation), a :class:`FramesVideoProcessor` that runs the image processor frame by frame, so video
  tasks still run. Pixel values can differ slightly from torchvision's resampling (PIL is used);
- for the others, no video processor: their video tasks are refused with a message naming torchvision.

Remote code is never run.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from omnimerge.engine.errors import EvaluationError

__all__ = ["load_model_and_processor", "load_processor", "box_format_for", "MODEL_BOX_FORMATS", "FRAME_VIDEO_FAMILIES",
           "FramesVideoProcessor"]  # fmt: skip

logger = logging.getLogger(__name__)

# config.model_type -> how that family writes boxes (boxes.BOX_FORMATS).
MODEL_BOX_FORMATS = {
    "qwen2_vl": "qwen2vl",
    "qwen2_5_vl": "qwen2.5vl",
    "internvl": "internvl",
    "internvl_chat": "internvl",
}


# config.model_type of families whose video processor is the image processor applied to each frame.
FRAME_VIDEO_FAMILIES = ("video_llava",)


def box_format_for(model_type: str) -> str:
    """The box format of a model family (``auto`` for families without a known one)."""
    return MODEL_BOX_FORMATS.get(model_type, "auto")


class FramesVideoProcessor:
    """A video processor made of an image processor: every frame goes through it as an image.

    ``videos`` is a list of videos, each a list of frames (PIL images or arrays); the output holds
    ``pixel_values_videos`` of shape ``[videos, frames, channels, height, width]`` (all videos of one call must
    have the same number of frames and come out the same size, as for the ``transformers`` video processors).
    """

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, videos: Any, return_tensors: Any = None, **_: Any) -> Any:
        import numpy as np
        from transformers import BatchFeature

        stacked = []
        for frames in videos:
            output = self.image_processor(images=list(frames), return_tensors="np")
            pixels = next(v for k, v in output.items() if k.startswith("pixel_values"))
            stacked.append(np.asarray(pixels))
        if len({p.shape for p in stacked}) > 1:
            shapes = ", ".join(str(tuple(p.shape)) for p in stacked)
            raise EvaluationError(f"Videos of one batch differ in frames or size ({shapes}); give each task's videos "
                                  "one frame count (num_frames) and evaluate with batch size 1 otherwise.")  # fmt: skip
        return BatchFeature({"pixel_values_videos": np.stack(stacked)}, tensor_type=return_tensors)

    def to_dict(self) -> dict[str, Any]:
        return {"video_processor_type": type(self).__name__, "image_processor": type(self.image_processor).__name__}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.image_processor).__name__})"


class _WithoutVideoProcessor:
    """Mixin for a ``ProcessorMixin`` subclass: accept ``video_processor=None`` or a ``FramesVideoProcessor``."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and (argument is None or isinstance(argument, FramesVideoProcessor)):
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
            frames = model_type in FRAME_VIDEO_FAMILIES
            if "video_processor" in processor_class.get_attributes():
                kwargs["video_processor"] = FramesVideoProcessor(image_processor) if frames else None
            processor = _image_only_class(processor_class)(**kwargs, chat_template=_chat_template(path, tokenizer))
        except (ImportError, OSError, ValueError, TypeError, AttributeError) as error:
            raise EvaluationError(
                f"Processor of model '{path}' cannot be loaded: AutoProcessor said '{auto_error}', and building "
                f"{class_name} from its image processor and tokenizer said '{error}'. Check the processor files."
            ) from error
        reason = str(auto_error).strip().splitlines()[0] if str(auto_error).strip() else type(auto_error).__name__
        how = "with frame-by-frame video through its image processor" if frames else "without a video processor"
        logger.info("%s: AutoProcessor failed (%s); using %s %s", path, reason, class_name, how)
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
