"""Per-sample metrics of the benchmark's ten columns, and their registry (EVALUATION.md).

Every metric is a pure function ``name(prediction, reference) -> Scored``: the score of one sample in
[0, 1] and the answer it extracted (recorded beside the prediction so the score can be audited). A task's
value is the mean over its samples. Registry name = function name; suites name metrics by it.

| metric | columns |
|---|---|
| ``vqa_accuracy`` | VizWiz, TextVQA (10 human answers, EvalAI normalisation) |
| ``exact_match_gqa`` | GQA |
| ``relaxed_accuracy`` | ChartQA |
| ``exact_match_ocrvqa`` | OCRVQA |
| ``math_accuracy`` | MathVista, MATH-Vision (rule-based extraction, no LLM judge) |
| ``grounding_accuracy`` | RefCOCO, RefCOCO+, RefCOCOg (Acc@0.5) |
| ``multiple_choice`` | MUSIC-AVQA, AVQA, any lettered-options task |
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple

from .answers import (
    LETTERS,
    canonical_answer,
    choice_index,
    extract_choice,
    extract_math_answer,
    numbers_match,
    parse_number,
)
from .boxes import box_iou, parse_box, xywh_to_xyxy
from .normalize import normalize_vqa_answer, strip_punctuation

__all__ = [
    "Reference",
    "Scored",
    "MetricSpec",
    "METRICS",
    "get_metric",
    "metric_names",
    "vqa_accuracy",
    "exact_match_gqa",
    "exact_match_ocrvqa",
    "relaxed_accuracy",
    "math_accuracy",
    "grounding_accuracy",
    "multiple_choice",
]


@dataclass(frozen=True)
class Reference:
    """What a metric compares a prediction with: one sample's ground truth.

    Attributes:
        answers: Reference answers (10 human answers for VQA; one for most tasks).
        choices: Options of a multiple-choice question, in letter order.
        bbox: Ground-truth box ``[x, y, w, h]`` in original-image pixels (grounding).
        width: Original image width in pixels (grounding).
        height: Original image height in pixels (grounding).
        resized: ``(width, height)`` of the image the model saw (Qwen2.5-VL boxes).
        box_format: How the model writes boxes (``boxes.BOX_FORMATS`` or ``auto``).
    """

    answers: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    bbox: tuple[float, float, float, float] | None = None
    width: float | None = None
    height: float | None = None
    resized: tuple[float, float] | None = None
    box_format: str = "auto"


class Scored(NamedTuple):
    """One sample's score in [0, 1] and the answer the metric read from the prediction (``None``: nothing)."""

    score: float
    extracted: str | None


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric: its name (= function name), the function and what it needs from a sample."""

    name: str
    fn: Callable[[str, Reference], Scored]
    needs: tuple[str, ...]
    summary: str


METRICS: dict[str, MetricSpec] = {}


def _register(*needs: str) -> Callable[[Callable[[str, Reference], Scored]], Callable[[str, Reference], Scored]]:
    def decorate(fn: Callable[[str, Reference], Scored]) -> Callable[[str, Reference], Scored]:
        summary = (fn.__doc__ or "").strip().splitlines()[0]
        METRICS[fn.__name__] = MetricSpec(fn.__name__, fn, tuple(needs), summary)
        return fn

    return decorate


def metric_names() -> list[str]:
    """Names of every registered metric, sorted."""
    return sorted(METRICS)


def get_metric(name: str) -> MetricSpec:
    """The metric registered under ``name``.

    Raises:
        KeyError: Unknown name; the message suggests the closest names and lists all.
    """
    if name in METRICS:
        return METRICS[name]
    close = difflib.get_close_matches(name, METRICS, n=2)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(f"Unknown metric '{name}'.{hint} Known metrics: {', '.join(metric_names())}.")


@_register("answers")
def vqa_accuracy(prediction: str, reference: Reference) -> Scored:
    """VQA accuracy: mean over i of min(1, m_i / 3), m_i = matches among the other human answers.

    acc = (1/n) Σᵢ min(1, mᵢ / k) after EvalAI normalisation of the prediction and every answer, with
    k = 3 for the standard n = 10 answers. For fewer answers k = min(3, n − 1) (a lone answer: exact match),
    which equals the toolkits' formula whenever n ≥ 4.
    """
    pred = normalize_vqa_answer(prediction)
    answers = [normalize_vqa_answer(a) for a in reference.answers]
    n = len(answers)
    if n == 0:
        return Scored(0.0, pred)
    if n == 1:
        return Scored(float(pred == answers[0]), pred)
    needed = min(3, n - 1)
    total = 0.0
    for i in range(n):
        matches = sum(1 for j, answer in enumerate(answers) if j != i and answer == pred)
        total += min(1.0, matches / needed)
    return Scored(total / n, pred)


@_register("answers")
def exact_match_gqa(prediction: str, reference: Reference) -> Scored:
    """GQA exact match: lowercase, ASCII punctuation deleted, whitespace collapsed; articles kept."""
    pred = strip_punctuation(prediction)
    return Scored(float(any(pred == strip_punctuation(a) for a in reference.answers)), pred)


@_register("answers")
def exact_match_ocrvqa(prediction: str, reference: Reference) -> Scored:
    """OCRVQA exact match of stripped, lowercased strings; max over references."""
    pred = prediction.strip().lower()
    return Scored(float(any(pred == a.strip().lower() for a in reference.answers)), pred)


_CHART_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?%?$")


def _chart_float(text: str) -> float | None:
    if not _CHART_NUMBER.match(text):
        return None
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def _relaxed_correct(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    pred_value, target_value = _chart_float(prediction), _chart_float(target)
    if pred_value is not None and target_value:  # target 0 falls through to exact match
        return abs(pred_value - target_value) / abs(target_value) <= tolerance
    return prediction.lower() == target.lower()


@_register("answers")
def relaxed_accuracy(prediction: str, reference: Reference) -> Scored:
    """ChartQA relaxed accuracy: numbers within 5% of a non-zero reference, else case-insensitive match.

    A trailing ``%`` divides by 100 (``"12%"`` equals ``"0.12"``); |p − t| / |t| ≤ 0.05; max over references.
    """
    pred = prediction.strip()
    return Scored(float(any(_relaxed_correct(pred, a.strip()) for a in reference.answers)), pred)


@_register("answers")
def math_accuracy(prediction: str, reference: Reference) -> Scored:
    """MathVista / MATH-Vision accuracy after rule-based answer extraction (``answers`` module).

    Multiple choice: the extracted letter must pick the reference (a letter or a choice's text). A numeric
    reference: the extracted number must match at the reference's precision. Otherwise: case-insensitive
    match of the extracted text (surrounding ``$`` and a final period ignored).
    """
    if not reference.answers:
        return Scored(0.0, None)
    target = reference.answers[0]
    if reference.choices:
        extracted = extract_math_answer(prediction, choices=reference.choices)
        gold = choice_index(target, reference.choices)
        hit = extracted is not None and gold is not None and LETTERS.index(extracted) == gold
        return Scored(float(hit), extracted)
    numeric = parse_number(target) is not None
    extracted = extract_math_answer(prediction, numeric=numeric)
    if extracted is None:
        return Scored(0.0, None)
    if numeric:
        value = parse_number(extracted)
        return Scored(float(value is not None and numbers_match(value, target)), extracted)
    hit = any(canonical_answer(extracted) == canonical_answer(a) for a in reference.answers)
    return Scored(float(hit), extracted)


@_register("bbox", "width", "height")
def grounding_accuracy(prediction: str, reference: Reference) -> Scored:
    """Acc@0.5: a hit iff IoU(predicted box, ground truth) ≥ 0.5; an answer without a parseable box misses.

    The ground truth ``[x, y, w, h]`` (pixels) becomes ``[x1, y1, x2, y2]``; the prediction is parsed in the
    task's box format and converted to original-image pixels. ``extracted`` records the box in pixels and
    the format that read it, e.g. ``"qwen2vl:[10.0, 20.0, 50.0, 60.0]"``.
    """
    if reference.bbox is None or reference.width is None or reference.height is None:
        return Scored(0.0, None)
    parsed = parse_box(
        prediction,
        reference.box_format,
        width=reference.width,
        height=reference.height,
        resized=reference.resized,
    )
    if parsed is None:
        return Scored(0.0, None)
    iou = box_iou(parsed.box, xywh_to_xyxy(reference.bbox))
    shown = ", ".join(f"{v:.1f}" for v in parsed.box)
    return Scored(float(iou >= 0.5), f"{parsed.format}:[{shown}]")


@_register("answers")
def multiple_choice(prediction: str, reference: Reference) -> Scored:
    """Top-1 accuracy: with choices, the picked option (letter or text) must be the reference's;
    without, the stripped lowercased answer must equal a reference from the closed answer set."""
    if reference.choices:
        picked = extract_choice(prediction, reference.choices)
        gold = choice_index(reference.answers[0], reference.choices) if reference.answers else None
        letter = None if picked is None else LETTERS[picked]
        return Scored(float(picked is not None and picked == gold), letter)
    pred = prediction.strip().rstrip(".").lower()
    return Scored(float(any(pred == a.strip().lower() for a in reference.answers)), pred)
