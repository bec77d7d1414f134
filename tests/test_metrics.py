"""Metrics against hand-worked examples, including the awkward cases EVALUATION.md lists."""

from __future__ import annotations

import pytest

from omnimerge.engine.evaluation.answers import extract_choice, extract_math_answer, last_boxed, parse_number
from omnimerge.engine.evaluation.boxes import box_iou, parse_box, xywh_to_xyxy
from omnimerge.engine.evaluation.metrics import (
    Reference,
    exact_match_gqa,
    exact_match_ocrvqa,
    get_metric,
    grounding_accuracy,
    math_accuracy,
    metric_names,
    multiple_choice,
    relaxed_accuracy,
    vqa_accuracy,
)
from omnimerge.engine.evaluation.normalize import normalize_vqa_answer, strip_punctuation


# --- EvalAI normalisation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),  # number word, final period removed
        ("The 3.5", "3.5"),  # article dropped, period inside a number kept
        (".5 cups", ".5 cups"),  # period before a digit kept
        ("5.", "5"),  # period not followed by a digit removed
        ("u.s.a.", "usa"),
        ("yes!", "yes"),  # '!' touches no space: replaced by a space, then trimmed
        ("black and-white", "black and white"),  # '-' inside a word: becomes a space
        ("red - blue", "red blue"),  # '-' touches a space: deleted
        ("1,000", "1000"),  # commas removed first
        ("dont know", "don't know"),  # contraction restored
        ("None", "0"),
        ("man's hat", "man 's hat"),  # possessive split off as the toolkits do
        ("Hello\nWorld\tagain", "hello world again"),
        ("an apple", "apple"),
        ("What?", "what"),
        ("  lots   of   space ", "lots of space"),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_strip_punctuation_keeps_articles() -> None:
    assert strip_punctuation("A red, shiny car.") == "a red shiny car"


# --- VQA accuracy ----------------------------------------------------------------------------------------
def _ten(matching: int, answer: str = "2", other: str = "3") -> Reference:
    return Reference(answers=tuple([answer] * matching + [other] * (10 - matching)))


@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        # Each of the 10 answers i scores min(1, m_i/3) with m_i counted among the other nine.
        (0, 0.0),
        (1, 0.3),  # the matching one sees 0 others (0); the 9 others see 1 match (1/3 each): 3/10
        (2, 0.6),  # 2 × 1/3 + 8 × 2/3 = 6 → 0.6
        (3, 0.9),  # 3 × 2/3 + 7 × 1 = 9 → 0.9
        (4, 1.0),  # 4 × 1 + 6 × 1
        (10, 1.0),
    ],
)
def test_vqa_accuracy_over_ten_answers(matching: int, expected: float) -> None:
    assert vqa_accuracy("two", _ten(matching)).score == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides() -> None:
    ref = Reference(answers=("Unanswerable",) * 3 + ("a dog",) * 7)
    assert vqa_accuracy("unanswerable.", ref).score == pytest.approx(0.9)
    assert vqa_accuracy("The dog!", ref) == (1.0, "dog")


def test_vqa_accuracy_with_few_answers() -> None:
    assert vqa_accuracy("Yes", Reference(answers=("yes",))).score == 1.0  # lone answer: exact match
    assert vqa_accuracy("no", Reference(answers=("yes",))).score == 0.0
    # n = 2 needs min(3, 1) = 1 other: each answer sees the other one matching.
    assert vqa_accuracy("yes", Reference(answers=("yes", "yes"))).score == 1.0
    assert vqa_accuracy("yes", Reference(answers=("yes", "no"))).score == pytest.approx(0.5)
    assert vqa_accuracy("yes", Reference(answers=())).score == 0.0


# --- exact match -----------------------------------------------------------------------------------------
def test_exact_match_gqa() -> None:
    assert exact_match_gqa("The red car.", Reference(answers=("the red car",))).score == 1.0
    assert exact_match_gqa("red car", Reference(answers=("the red car",))).score == 0.0  # articles kept
    assert exact_match_gqa("Yes", Reference(answers=("no", "yes"))).score == 1.0


def test_exact_match_ocrvqa() -> None:
    assert exact_match_ocrvqa("  Harry Potter ", Reference(answers=("harry potter",))).score == 1.0
    assert exact_match_ocrvqa("Harry Potter.", Reference(answers=("harry potter",))).score == 0.0
    assert exact_match_ocrvqa("no", Reference(answers=("yes", "No"))).score == 1.0


# --- ChartQA relaxed accuracy ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("12%", ("0.12",), 1.0),  # a trailing % divides by 100
        ("0.124", ("0.12",), 1.0),  # |0.004| / 0.12 = 3.3% ≤ 5%
        ("0.127", ("0.12",), 0.0),  # 5.8% > 5%
        ("105", ("100",), 1.0),  # exactly 5%: inclusive
        ("-5", ("-5.2",), 1.0),  # 0.2 / 5.2 = 3.8%
        ("0", ("0",), 1.0),  # reference 0: exact string match
        ("0.0", ("0",), 0.0),  # reference 0: no relative tolerance, strings differ
        ("Yes", ("yes",), 1.0),  # case-insensitive text
        ("1,000", ("1000",), 0.0),  # a thousands comma is not a number: strings differ
        ("20.5", ("10", "20"), 1.0),  # max over references
        ("nan", ("nan",), 1.0),  # not parsed as a number; equal text
        (" 7 ", ("7",), 1.0),
    ],
)
def test_relaxed_accuracy(prediction: str, answers: tuple[str, ...], expected: float) -> None:
    assert relaxed_accuracy(prediction, Reference(answers=answers)).score == expected


# --- math answer extraction ------------------------------------------------------------------------------
ANGLES = ("30°", "45°", "60°", "90°")


@pytest.mark.parametrize(
    ("prediction", "expected_letter", "score"),
    [
        ("The answer is (C).", "C", 1.0),
        ("C", "C", 1.0),
        ("(C) 60°", "C", 1.0),
        ("60°", "C", 1.0),  # the text of a choice
        ("\\boxed{C}", "C", 1.0),
        ("So the angle is 60° as shown", "C", 1.0),  # exactly one choice text occurs
        ("A", "A", 0.0),
        ("I cannot tell", None, 0.0),
        ("Either 30° or 60°", None, 0.0),  # two choice texts: undecided
    ],
)
def test_math_accuracy_multiple_choice(prediction: str, expected_letter: str | None, score: float) -> None:
    result = math_accuracy(prediction, Reference(answers=("60°",), choices=ANGLES))
    assert result == (score, expected_letter)


def test_math_accuracy_letter_reference() -> None:  # MATH-Vision stores the letter
    ref = Reference(answers=("B",), choices=("1", "2", "3", "4", "5"))
    assert math_accuracy("B", ref).score == 1.0
    assert math_accuracy("The answer is 2", ref).score == 1.0  # choice text "2" as a whole word
    assert math_accuracy("The answer is 12", ref).score == 0.0  # "2" inside "12" is not the choice


@pytest.mark.parametrize(
    ("prediction", "answer", "extracted", "score"),
    [
        ("so the answer is 3.", "3", "3", 1.0),  # cue, then the first number
        ("The answer is 5 degrees since AB = 3", "5", "5", 1.0),
        ("x = 2 and y = 3", "3", "3", 1.0),  # no cue: the last number
        ("\\boxed{3} or rather \\boxed{4}", "3", "4", 0.0),  # the last \boxed{} counts
        ("\\boxed{\\frac{3}{2}}", "1.5", "\\frac{3}{2}", 1.0),
        ("\\boxed{60^\\circ}", "60", "60^\\circ", 1.0),
        ("3.0", "3", "3.0", 1.0),  # an integer reference is met exactly
        ("2.6", "3", "2.6", 0.0),  # ... not by rounding
        ("1.45", "1.5", "1.45", 1.0),  # one-decimal reference: round half up to 1.5
        ("1.44", "1.5", "1.44", 0.0),
        ("The total is 1,000", "1000", "1,000", 1.0),
        ("I don't know", "3", None, 0.0),
        ("\\boxed{2\\sqrt{3}}", "2\\sqrt{3}", "2\\sqrt{3}", 1.0),  # non-numeric reference: text match
        ("The answer is $x^2$.", "x^2", "$x^2$", 1.0),
    ],
)
def test_math_accuracy_free_form(prediction: str, answer: str, extracted: str | None, score: float) -> None:
    assert math_accuracy(prediction, Reference(answers=(answer,))) == (score, extracted)


def test_answer_helpers() -> None:
    assert last_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("cut off \\boxed{12") is None
    assert parse_number("3/4") == 0.75
    assert parse_number("-2.5") == -2.5
    assert parse_number("1,234.5") == 1234.5
    assert parse_number("12 apples") is None
    assert parse_number("1/0") is None
    assert extract_math_answer("nothing here", numeric=True) is None
    assert extract_choice("A dog", ("cat", "dog")) == 0  # a leading capital letter reads as a choice
    assert extract_choice("a dog", ("cat", "dog")) == 1


# --- grounding -------------------------------------------------------------------------------------------
# Image 200 × 100; ground truth [x, y, w, h] = [20, 10, 80, 40] → (20, 10, 100, 50), area 3200.
GT = Reference(bbox=(20, 10, 80, 40), width=200, height=100, box_format="qwen2vl")


def test_grounding_qwen2vl_grid() -> None:
    # (100,100),(500,500) on 0-1000 → (20, 10, 100, 50): the ground truth exactly.
    answer = "<|box_start|>(100,100),(500,500)<|box_end|>"
    assert grounding_accuracy(answer, GT) == (1.0, "qwen2vl:[20.0, 10.0, 100.0, 50.0]")
    # x2 = 300 → 60 px: intersection 40 × 40 = 1600, union 3200 → IoU exactly 0.5, a hit.
    assert grounding_accuracy("the dog(100,100),(300,500)", GT).score == 1.0
    # x2 = 290 → 58 px: 38 × 40 = 1520 / 3200 = 0.475, a miss.
    assert grounding_accuracy("(100,100),(290,500)", GT).score == 0.0


def test_grounding_other_families_and_misses() -> None:
    internvl = Reference(bbox=(20, 10, 80, 40), width=200, height=100, box_format="internvl")
    assert grounding_accuracy("dog[[100, 100, 500, 500]]", internvl).score == 1.0
    assert grounding_accuracy("[[100, 100, 500, 500]]", GT) == (0.0, None)  # not the qwen2vl format
    # Qwen2.5-VL: pixels of the resized 400 × 200 image, i.e. twice the original.
    q25 = Reference(bbox=(20, 10, 80, 40), width=200, height=100, resized=(400, 200), box_format="qwen2.5vl")
    assert grounding_accuracy("[40, 20, 200, 100]", q25).score == 1.0
    assert grounding_accuracy('{"bbox_2d": [40, 20, 200, 100], "label": "dog"}', q25).score == 1.0
    assert grounding_accuracy("the dog on the left", GT) == (0.0, None)
    auto = Reference(bbox=(20, 10, 80, 40), width=200, height=100, box_format="auto")
    assert grounding_accuracy("[[100, 100, 500, 500]]", auto).extracted == "internvl:[20.0, 10.0, 100.0, 50.0]"


def test_box_helpers() -> None:
    assert xywh_to_xyxy([1, 2, 3, 4]) == (1.0, 2.0, 4.0, 6.0)
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((5, 5, 1, 1), (0, 0, 10, 10)) == 0.0  # inverted box is empty
    with pytest.raises(ValueError, match="Unknown box format 'qwen3'. Known formats: qwen2vl, internvl, qwen2.5vl"):
        parse_box("(1,2),(3,4)", "qwen3", width=10, height=10)


# --- multiple choice and the registry --------------------------------------------------------------------
def test_multiple_choice() -> None:
    ref = Reference(answers=("B",), choices=("cat", "dog", "bird", "fish"))
    assert multiple_choice("(B) dog", ref) == (1.0, "B")
    assert multiple_choice("dog", ref) == (1.0, "B")
    assert multiple_choice("fish", ref) == (0.0, "D")
    assert multiple_choice("Yes.", Reference(answers=("yes",))).score == 1.0  # closed answer set


def test_registry() -> None:
    assert metric_names() == sorted(
        [
            "exact_match_gqa",
            "exact_match_ocrvqa",
            "grounding_accuracy",
            "math_accuracy",
            "multiple_choice",
            "relaxed_accuracy",
            "vqa_accuracy",
        ]
    )
    assert get_metric("vqa_accuracy").fn is vqa_accuracy
    expected = "Unknown metric 'vqa_acuracy'. Did you mean 'vqa_accuracy' or 'math_accuracy'\\? Known metrics: exact_"
    with pytest.raises(KeyError, match=expected):
        get_metric("vqa_acuracy")
