"""Rule-based answer extraction: choice letters and texts, the last ``\\boxed{}``, numbers.

MathVista and MATH-Vision answers are free text; the public toolkits extract the answer with rules and fall
back to an LLM judge. We implement the rules only (EVALUATION.md):

* **choices** -- a leading letter (``B``, ``(B)``, ``B.``, ``B)``), a cue (``answer is (B)``, ``Answer: B``,
  ``option B``), a bracketed letter anywhere, the text of exactly one choice (the whole answer, then a
  whole-word occurrence);
* **``\\boxed{}``** -- the content of the last one, braces balanced;
* **numbers** -- after a cue (``the answer is``, ``Answer:``) the first number, else the last number in the
  text; ``1,000`` (thousands), ``-2.5``, ``3/4`` and ``\\frac{3}{4}`` parse.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

__all__ = [
    "LETTERS",
    "canonical_answer",
    "choice_index",
    "extract_choice",
    "last_boxed",
    "parse_number",
    "extract_number",
    "extract_math_answer",
    "numbers_match",
]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CUE = re.compile(r"(?:the\s+(?:final\s+|correct\s+)?answer\s+is|answer\s*:|option)\s*:?\s*", re.IGNORECASE)
_NUMBER = re.compile(
    r"\\d?frac\{\s*-?\d+(?:\.\d+)?\s*\}\{\s*-?\d+(?:\.\d+)?\s*\}"  # \frac{a}{b}, \dfrac{a}{b}
    r"|-?\d+(?:\.\d+)?\s*/\s*\d+(?:\.\d+)?"  # a/b
    r"|-?\d{1,3}(?:,\d{3})+(?:\.\d+)?"  # 1,000.5
    r"|-?\d+(?:\.\d+)?"  # 12, -2.5
    r"|-?\.\d+"  # .5
)
_FRAC = re.compile(r"^\\d?frac\{\s*(-?\d+(?:\.\d+)?)\s*\}\{\s*(-?\d+(?:\.\d+)?)\s*\}$")
_SLASH = re.compile(r"^(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)$")
_PLAIN = re.compile(r"^-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?$")


def canonical_answer(text: str) -> str:
    """Lowercase, single spaces, surrounding ``$`` and a final period removed."""
    return " ".join(text.strip().strip("$").rstrip(".").lower().split())


def choice_index(answer: str, choices: list[str] | tuple[str, ...]) -> int | None:
    """Index of a reference answer among the choices: a letter (``"B"``) or the text of a choice."""
    canon = canonical_answer(answer)
    for i, choice in enumerate(choices):
        if canon == canonical_answer(choice):
            return i
    stripped = answer.strip().strip("()").rstrip(".")
    if len(stripped) == 1 and stripped.upper() in LETTERS[: len(choices)]:
        return LETTERS.index(stripped.upper())
    return None


def extract_choice(text: str, choices: list[str] | tuple[str, ...]) -> int | None:
    """Which choice a free-text answer picks (module docstring for the rules, in order).

    Args:
        text: The model's answer.
        choices: The options, in letter order (A is ``choices[0]``).

    Returns:
        The chosen index, or ``None`` when no rule decides.
    """
    if not choices:
        return None
    letters = LETTERS[: len(choices)]
    stripped = text.strip()
    lead = re.match(rf"^\(?([{letters}])(?:[.):]|\s|$)", stripped)
    if lead and (len(stripped) == 1 or not stripped[1:2].isalpha()):
        return letters.index(lead.group(1))
    cue = re.search(rf"(?:answer\s+is|answer\s*:|option)\s*:?\s*\(?([{letters}])\b", stripped, re.IGNORECASE)
    if cue and cue.group(1).upper() in letters:
        return letters.index(cue.group(1).upper())
    bracketed = set(re.findall(rf"\(([{letters}])\)", stripped))
    if len(bracketed) == 1:
        return letters.index(bracketed.pop())
    canon = canonical_answer(stripped)
    for i, choice in enumerate(choices):
        if canon == canonical_answer(choice):
            return i
    found = [
        i
        for i, choice in enumerate(choices)
        if canonical_answer(choice)
        and re.search(rf"(?<![\w.]){re.escape(canonical_answer(choice))}(?![\w]|\.\d)", canon)
    ]
    return found[0] if len(found) == 1 else None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces balanced), or ``None``."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # unbalanced: the answer was cut off


def parse_number(text: str) -> float | None:
    """The value of a string that is exactly one number (``"1,000"``, ``"-2.5"``, ``"3/4"``, ``"\\frac{3}{4}"``).

    A trailing ``%``, ``°`` or ``^\\circ`` and surrounding ``$`` are ignored. Returns ``None`` otherwise.
    """
    s = text.strip().strip("$").strip()
    s = re.sub(r"(\^\s*\{?\\circ\}?|°|%)$", "", s).strip().rstrip(".")
    if not s:
        return None
    if m := _FRAC.match(s) or _SLASH.match(s):
        den = float(m.group(2))
        return float(m.group(1)) / den if den else None
    if _PLAIN.match(s) and any(c.isdigit() for c in s):
        return float(s.replace(",", ""))
    return None


def extract_number(text: str, *, last: bool = True) -> str | None:
    """The last (or first) number written in a text, as written (``"1,000"``, ``"3/4"``)."""
    found = [m.group(0) for m in _NUMBER.finditer(text)]
    if not found:
        return None
    return found[-1] if last else found[0]


def extract_math_answer(text: str, *, choices: list[str] | tuple[str, ...] = (), numeric: bool = False) -> str | None:
    """The answer a math response commits to.

    Args:
        text: The model's answer.
        choices: Options of a multiple-choice question; when given, the result is the chosen letter.
        numeric: The reference is a number: reduce the candidate to one number.

    Returns:
        A letter (multiple choice), a number string (``numeric``), or the candidate text: the last ``\\boxed{}``
        content, else the text after the last cue (``the answer is``), else the whole text. ``None`` when
        nothing can be extracted.
    """
    boxed = last_boxed(text)
    if choices:
        index = extract_choice(boxed, choices) if boxed is not None else None
        if index is None:
            index = extract_choice(text, choices)
        return None if index is None else LETTERS[index]
    if boxed is not None:
        if not numeric or parse_number(boxed) is not None:
            return boxed
        return extract_number(boxed, last=False)
    cues = list(_CUE.finditer(text))
    if cues:
        after = text[cues[-1].end() :].strip()
        if not numeric:
            return after.rstrip(".") or None
        return extract_number(after, last=False)
    if not numeric:
        return text.strip() or None
    return extract_number(text, last=True)


def numbers_match(prediction: float, reference_text: str) -> bool:
    """Compare a predicted number with the reference at the reference's precision.

    An integer reference (``"3"``) must be met exactly (``3.0`` matches, ``2.6`` does not); a reference with
    d decimals (``"1.5"``) matches a prediction that rounds half-up to it at d decimals (``1.45`` -> ``1.5``).
    A fraction reference compares values within 1e-9.
    """
    reference = parse_number(reference_text)
    if reference is None:
        return False
    plain = re.sub(r"(\^\s*\{?\\circ\}?|°|%)$", "", reference_text.strip().strip("$")).strip().replace(",", "")
    if "." not in plain or not _PLAIN.match(plain):
        return abs(prediction - reference) <= 1e-9 * max(1.0, abs(reference))
    decimals = len(plain.split(".")[1])
    try:
        quantum = Decimal(1).scaleb(-decimals)
        rounded = Decimal(repr(prediction)).quantize(quantum, rounding=ROUND_HALF_UP)
    except InvalidOperation:
        return False
    return rounded == Decimal(plain)
