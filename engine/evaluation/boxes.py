"""Bounding boxes in model answers, per model family, and intersection over union.

Each family answers a grounding prompt in its own coordinate system (EVALUATION.md):

* ``qwen2vl``: ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` on a 0-1000 grid of the original image (the box
  tokens are special tokens, so decoded text usually holds just ``(x1,y1),(x2,y2)``);
* ``internvl``: ``[[x1, y1, x2, y2]]`` on a 0-1000 grid of the original image;
* ``qwen2.5vl``: absolute pixels of the image *as the processor resized it*, ``[x1, y1, x2, y2]`` or JSON
  ``{"bbox_2d": [x1, y1, x2, y2]}``; converting to original pixels needs the resized size.

Every parser returns a :class:`ParsedBox` that says which format it read, so a score can be audited. Boxes are
``(x1, y1, x2, y2)`` tuples in original-image pixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

__all__ = [
    "BOX_FORMATS",
    "ParsedBox",
    "parse_box",
    "xywh_to_xyxy",
    "box_iou",
]

Box = tuple[float, float, float, float]

_NUM = r"(-?\d+(?:\.\d+)?)"
_SEP = r"\s*,\s*"
_QWEN2VL_BOX = re.compile(rf"\(\s*{_NUM}{_SEP}{_NUM}\s*\){_SEP}\(\s*{_NUM}{_SEP}{_NUM}\s*\)")
_DOUBLE_BRACKET_BOX = re.compile(rf"\[\[\s*{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}\s*\]\]")
_BRACKET_BOX = re.compile(rf"\[\s*{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}\s*\]")


@dataclass(frozen=True)
class ParsedBox:
    """A box read from a model answer.

    Attributes:
        box: ``(x1, y1, x2, y2)`` in original-image pixels.
        format: The box format that read it (a key of ``BOX_FORMATS``).
        raw: The coordinates as written in the answer.
    """

    box: Box
    format: str
    raw: tuple[float, float, float, float]


def xywh_to_xyxy(bbox: tuple[float, float, float, float] | list[float]) -> Box:
    """``[x, y, w, h]`` (COCO, RefCOCO annotations) -> ``(x1, y1, x2, y2)``."""
    x, y, w, h = (float(v) for v in bbox)
    return (x, y, x + w, y + h)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes; 0 when either is empty or inverted.

    IoU = |a ∩ b| / (|a| + |b| − |a ∩ b|), areas in continuous coordinates (no +1 pixel convention).
    """
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _first_match(pattern: re.Pattern[str], text: str) -> tuple[float, float, float, float] | None:
    match = pattern.search(text)
    if match is None:
        return None
    x1, y1, x2, y2 = (float(g) for g in match.groups())
    return (x1, y1, x2, y2)


def _scale(raw: tuple[float, float, float, float], sx: float, sy: float) -> Box:
    x1, y1, x2, y2 = raw
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def _parse_qwen2vl(text: str, width: float, height: float, resized: tuple[float, float] | None) -> ParsedBox | None:
    raw = _first_match(_QWEN2VL_BOX, text)
    return None if raw is None else ParsedBox(_scale(raw, width / 1000, height / 1000), "qwen2vl", raw)


def _parse_internvl(text: str, width: float, height: float, resized: tuple[float, float] | None) -> ParsedBox | None:
    raw = _first_match(_DOUBLE_BRACKET_BOX, text)
    return None if raw is None else ParsedBox(_scale(raw, width / 1000, height / 1000), "internvl", raw)


def _parse_qwen25vl(text: str, width: float, height: float, resized: tuple[float, float] | None) -> ParsedBox | None:
    raw = _first_match(_BRACKET_BOX, text)
    if raw is None:
        return None
    resized_w, resized_h = resized if resized else (width, height)
    return ParsedBox(_scale(raw, width / resized_w, height / resized_h), "qwen2.5vl", raw)


_Parser = Callable[[str, float, float, "tuple[float, float] | None"], "ParsedBox | None"]

BOX_FORMATS: dict[str, _Parser] = {
    "qwen2vl": _parse_qwen2vl,
    "internvl": _parse_internvl,
    "qwen2.5vl": _parse_qwen25vl,
}


def parse_box(
    text: str,
    box_format: str,
    *,
    width: float,
    height: float,
    resized: tuple[float, float] | None = None,
) -> ParsedBox | None:
    """Read the first box in a model answer and convert it to original-image pixels.

    Args:
        text: The decoded answer.
        box_format: ``qwen2vl``, ``internvl``, ``qwen2.5vl``, or ``auto`` (tries them in that order and
            reports the first that matched in ``ParsedBox.format``).
        width: Original image width in pixels.
        height: Original image height in pixels.
        resized: ``(width, height)`` of the image the model saw; only ``qwen2.5vl`` needs it (absent: the
            original size, i.e. no rescaling).

    Returns:
        The box, or ``None`` when the answer holds no box in that format (a miss for Acc@0.5).

    Raises:
        ValueError: Unknown ``box_format``.
    """
    if box_format == "auto":
        for parser in BOX_FORMATS.values():
            parsed = parser(text, width, height, resized)
            if parsed is not None:
                return parsed
        return None
    if box_format not in BOX_FORMATS:
        known = ", ".join([*BOX_FORMATS, "auto"])
        raise ValueError(f"Unknown box format '{box_format}'. Known formats: {known}.")
    return BOX_FORMATS[box_format](text, width, height, resized)
