"""Synthetic renderings of the paper's five capabilities, drawn with PIL on 112×112 images.

Each task mirrors one column family of the benchmark (PAPER.md) at toy scale:

============  ===========================================  ==============================================
task          image                                        question → answer (metric, EVALUATION.md)
============  ===========================================  ==============================================
vqa           1-4 coloured shapes on a 3×3 grid            colour / shape / count / yes-no (exact match)
geometry      a regular polygon, or an angle between rays  sides or angle type, choice letter (multi choice)
chart         a bar chart, bars A.. with values 1-9        a bar's value, tallest / shortest (relaxed acc.)
ocr           two words on two lines, in two inks          the word at a line / in an ink (exact match)
grounding     2-4 coloured shapes on a 3×3 grid            Qwen2-VL box ``(x1,y1),(x2,y2)`` on 0-1000 (Acc@0.5)
============  ===========================================  ==============================================

Every image also has a caption (the pre-training target), which names everything the tasks ask about.
A sample is a pure function of ``(seed, task, stream, index)``; streams (``pretrain``, ``pretrain-qa``,
``train``, ``test``) seed disjointly, so test items never share a random stream with training.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "TASKS",
    "CAPABILITIES",
    "IMAGE_SIZE",
    "CAPTION_PROMPT",
    "PROMPTS",
    "Sample",
    "make_sample",
    "make_caption_sample",
    "make_object_caption_sample",
    "user_text",
    "vocabulary_text",
    "box_to_qwen",
    "png_bytes",
]

TASKS: tuple[str, ...] = ("vqa", "geometry", "chart", "ocr", "grounding")
CAPABILITIES = {"vqa": "VQA", "geometry": "Geometry", "chart": "Chart", "ocr": "OCR", "grounding": "Grounding"}
IMAGE_SIZE = 112

CAPTION_PROMPT = "Describe the image."
SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOICE_ANSWER = "Answer with the option's letter from the given choices directly."
# The user text the evaluator builds from a test row: ``prompt.format(question=row["question"])``.
PROMPTS = {
    "vqa": "{question}\n" + SHORT_ANSWER,
    "geometry": "{question}\n" + CHOICE_ANSWER,
    "chart": "{question}\n" + SHORT_ANSWER,
    "ocr": "{question}\n" + SHORT_ANSWER,
    "grounding": "Output the bounding box of {question}.",
}

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# Cells of the 3×3 layout grid, row-major, as captions name them.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
POLYGONS = {3: "triangle", 4: "square", 6: "hexagon"}
ANGLE_TYPES = ("acute", "right", "obtuse")
BAR_LABELS = "ABCDE"
OCR_WORDS = ("cat", "dog", "sun", "tree", "fish", "bird", "moon", "star", "boat", "cake", "lamp", "door", "king", "milk", "rose", "wolf")
INK = {"black": (20, 20, 20), "blue": (30, 50, 170), "red": (170, 30, 30)}

CELL = IMAGE_SIZE / 3


@dataclass
class Sample:
    """One rendered item: an image, the question as stored in a test set, and its references.

    Attributes:
        image: the 112×112 RGB image.
        question: the ``question`` column (for grounding the referring expression).
        answer: the training target, in the format the model must produce.
        answers: references for scoring (the ``answers`` column).
        bbox: grounding only: the target box ``[x, y, w, h]`` in pixels.
        choices: geometry only: the options, in the order the question lists them (MathVista style).
        caption: the pre-training target for the same image.
    """

    image: Image.Image
    question: str
    answer: str
    answers: list[str]
    bbox: list[float] | None = None
    choices: list[str] = field(default_factory=list)
    caption: str = field(default="", repr=False)


def user_text(task: str, question: str) -> str:
    """The user turn's text for ``task`` (the suite's prompt applied to the question)."""
    return PROMPTS[task].format(question=question)


def box_to_qwen(bbox: list[float], width: int, height: int) -> str:
    """``[x, y, w, h]`` in pixels → Qwen2-VL's ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` on a 0-1000 grid."""
    x, y, w, h = bbox
    x1, y1 = round(1000 * x / width), round(1000 * y / height)
    x2, y2 = round(1000 * (x + w) / width), round(1000 * (y + h) / height)
    return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def _rng(seed: int, task: str, stream: str, index: int) -> random.Random:
    # A str seed is hashed with SHA-512 by random.Random: stable across processes and platforms.
    return random.Random(f"omnimerge-zoo/{seed}/{task}/{stream}/{index}")


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    return ImageFont.truetype(str(path), size)


@lru_cache(maxsize=1)
def _background() -> Image.Image:
    # A faint two-way gradient (red fades downwards, blue rightwards), like the uneven light of a photo.
    # It is what lets a vision tower with only relative (RoPE) positions tell where in the image it looks:
    # on a uniform background every patch of paper is the same and "top left" cannot be seen.
    import numpy as np

    ramp = np.linspace(0.0, 1.0, IMAGE_SIZE, dtype=np.float32)
    pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    pixels[..., 0] = 255 - 45 * ramp[:, None]
    pixels[..., 1] = 250
    pixels[..., 2] = 255 - 45 * ramp[None, :]
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = _background().copy()
    return image, ImageDraw.Draw(image)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill: tuple) -> list[float]:
    """Draws a filled shape centred at (cx, cy); returns its box ``[x, y, w, h]``."""
    r = size / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return [cx - r, cy - r, size, size]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _where(cell: int) -> str:
    return ("in the " if POSITIONS[cell] == "center" else "at the ") + POSITIONS[cell]


def _scene(rng: random.Random, low: int, high: int) -> tuple[Image.Image, list[dict]]:
    """1-4 shapes in distinct grid cells, each (colour, shape) pair at most once."""
    image, draw = _canvas()
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], rng.randint(low, high))
    cells = sorted(rng.sample(range(9), len(pairs)))
    objects = []
    for (color, shape), cell in zip(pairs, cells):
        cx = (cell % 3 + 0.5) * CELL + rng.uniform(-2, 2)
        cy = (cell // 3 + 0.5) * CELL + rng.uniform(-2, 2)
        box = _draw_shape(draw, shape, cx, cy, rng.uniform(30, 35), COLORS[color])
        objects.append({"color": color, "shape": shape, "cell": cell, "box": box})
    return image, objects


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _scene_caption(objects: list[dict]) -> str:
    parts = [f"{_article(o['color'])} {o['color']} {o['shape']} {_where(o['cell'])}" for o in objects]
    return _join(parts) + "."


def _vqa(rng: random.Random) -> Sample:
    image, objects = _scene(rng, 1, 3)
    kind = rng.randrange(5)
    by_shape = {s: [o for o in objects if o["shape"] == s] for s in SHAPES}
    by_color = {c: [o for o in objects if o["color"] == c] for c in COLORS}
    unique_shapes = [s for s, found in by_shape.items() if len(found) == 1]
    unique_colors = [c for c, found in by_color.items() if len(found) == 1]
    if kind == 0 and unique_shapes:
        shape = rng.choice(unique_shapes)
        question, answer = f"What color is the {shape}?", by_shape[shape][0]["color"]
    elif kind == 1 and unique_colors:
        color = rng.choice(unique_colors)
        question, answer = f"What shape is the {color} object?", by_color[color][0]["shape"]
    elif kind == 2:
        color = rng.choice(list(COLORS))
        question, answer = f"How many {color} objects are there?", str(len(by_color[color]))
    elif kind == 3:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if rng.random() < 0.5:  # ask about a present object half of the time
            color, shape = (lambda o: (o["color"], o["shape"]))(rng.choice(objects))
        present = any(o["color"] == color and o["shape"] == shape for o in objects)
        question, answer = f"Is there a {color} {shape}?", "yes" if present else "no"
    else:
        question, answer = "How many objects are there?", str(len(objects))
    return Sample(image, question, answer, [answer], caption=_scene_caption(objects))


def _grounding(rng: random.Random) -> Sample:
    image, objects = _scene(rng, 2, 3)
    target = rng.choice(objects)
    expression = f"the {target['color']} {target['shape']}"
    box = [round(v, 1) for v in target["box"]]
    answer = box_to_qwen(box, IMAGE_SIZE, IMAGE_SIZE)
    return Sample(image, expression, answer, [answer], bbox=box, caption=_scene_caption(objects))


def _geometry(rng: random.Random) -> Sample:
    image, draw = _canvas()
    ink_name = rng.choice(list(INK))
    ink = INK[ink_name]
    cx, cy = IMAGE_SIZE / 2 + rng.uniform(-8, 8), IMAGE_SIZE / 2 + rng.uniform(-8, 8)
    if rng.random() < 0.6:
        sides = rng.choice(list(POLYGONS))
        radius, turn = rng.uniform(28, 42), rng.uniform(0, 2 * math.pi)
        points = [
            (cx + radius * math.cos(turn + 2 * math.pi * k / sides), cy + radius * math.sin(turn + 2 * math.pi * k / sides))
            for k in range(sides)
        ]
        draw.polygon(points, fill=ink)
        choices = [str(n) for n in sorted(POLYGONS)]
        question = "How many sides does the polygon have?"
        correct = sorted(POLYGONS).index(sides)
        caption = f"a {POLYGONS[sides]} drawn in {ink_name}."
    else:
        kind = rng.randrange(3)
        degrees = (rng.uniform(20, 50), 90.0, rng.uniform(130, 160))[kind]
        start = rng.uniform(0, 360)
        length = rng.uniform(36, 48)
        vx, vy = cx - 0.0, cy + 0.0
        for angle in (start, start + degrees):
            rad = math.radians(angle)
            draw.line([(vx, vy), (vx + length * math.cos(rad), vy - length * math.sin(rad))], fill=ink, width=6)
        draw.ellipse([vx - 3, vy - 3, vx + 3, vy + 3], fill=ink)
        if kind == 1:  # the right-angle mark of geometry diagrams
            mark = [(vx + 12 * math.cos(math.radians(a)), vy - 12 * math.sin(math.radians(a))) for a in (start, start + 45, start + 90)]
            mark[1] = (vx + 17 * math.cos(math.radians(start + 45)), vy - 17 * math.sin(math.radians(start + 45)))
            draw.line(mark, fill=ink, width=3)
        choices = list(ANGLE_TYPES)
        question = "What type of angle is shown?"
        correct = kind
        caption = f"{_article(ANGLE_TYPES[kind])} {ANGLE_TYPES[kind]} angle drawn in {ink_name}."
    letters = "ABCD"
    listed = "\n".join(f"({letters[i]}) {choice}" for i, choice in enumerate(choices))
    question = f"Question: {question}\nChoices:\n{listed}"
    # MathVista keeps the correct choice's text as the answer; the model is asked for the letter.
    return Sample(image, question, letters[correct], [choices[correct]], choices=choices, caption=caption)


def _chart(rng: random.Random) -> Sample:
    image, draw = _canvas()
    count = rng.randint(3, 5)
    values = [rng.randint(1, 9) for _ in range(count)]
    color = COLORS[rng.choice(list(COLORS))]
    left, bottom, unit = 12, 98, 9.0
    slot = (IMAGE_SIZE - left - 4) / count
    width = slot * 0.6
    draw.line([(left - 2, 8), (left - 2, bottom)], fill=(60, 60, 60), width=1)
    draw.line([(left - 2, bottom), (IMAGE_SIZE - 2, bottom)], fill=(60, 60, 60), width=1)
    font = _font(10)
    for i, value in enumerate(values):
        x0 = left + i * slot + (slot - width) / 2
        draw.rectangle([x0, bottom - unit * value, x0 + width, bottom - 1], fill=color)
        draw.text((x0 + width / 2, bottom + 1), BAR_LABELS[i], fill=(20, 20, 20), font=font, anchor="ma")
    labels = BAR_LABELS[:count]
    kind = rng.randrange(3)
    if kind == 1 and values.count(max(values)) == 1:
        question, answer = "Which bar is the tallest?", labels[values.index(max(values))]
    elif kind == 2 and values.count(min(values)) == 1:
        question, answer = "Which bar is the shortest?", labels[values.index(min(values))]
    else:
        i = rng.randrange(count)
        question, answer = f"What is the value of bar {labels[i]}?", str(values[i])
    caption = "a bar chart with " + _join([f"bar {labels[i]} at {v}" for i, v in enumerate(values)]) + "."
    return Sample(image, question, answer, [answer], caption=caption)


def _ocr(rng: random.Random) -> Sample:
    # Two words on two lines, in two inks; the question picks one by line or by ink, as OCR-VQA asks for
    # one field (title, author) of a cover. Glyph shapes are the slowest thing a vision tower learns from
    # scratch (ZOO_NOTES.md), so the lines sit in fixed places and the words are one token each from a
    # vocabulary no other task answers with: three-digit numbers were so fragile that every other expert's
    # fine-tune, and so every merge, destroyed OCR. A single word was read so well after pre-training
    # (0.94) that its expert had nothing left to learn; picking one of two is the skill the expert adds.
    image, draw = _canvas()
    words = rng.sample(OCR_WORDS, 2)
    inks = rng.sample(list(INK), 2)
    for line, (word, ink) in enumerate(zip(words, inks)):
        centre = (IMAGE_SIZE / 2 + rng.uniform(-3, 3), IMAGE_SIZE * (0.3 + 0.4 * line) + rng.uniform(-2, 2))
        draw.text(centre, word, fill=INK[ink], font=_font(26), anchor="mm")
    pick = rng.randrange(2)
    if rng.random() < 0.5:
        question = f"What word is written at the {('top', 'bottom')[pick]}?"
    else:
        question = f"What word is written in {inks[pick]}?"
    caption = f"the word {words[0]} in {inks[0]} above the word {words[1]} in {inks[1]}."
    return Sample(image, question, words[pick], [words[pick]], caption=caption)


_RENDERERS: dict[str, Callable[[random.Random], Sample]] = {
    "vqa": _vqa,
    "geometry": _geometry,
    "chart": _chart,
    "ocr": _ocr,
    "grounding": _grounding,
}


def make_sample(task: str, stream: str, index: int, seed: int = 0) -> Sample:
    """Renders item ``index`` of ``task`` in ``stream``; the same arguments always give the same item.

    Args:
        task: one of :data:`TASKS`.
        stream: ``"pretrain"``, ``"pretrain-qa"``, ``"train"`` or ``"test"`` (seeded disjointly).
        index: position in the stream.
        seed: the zoo seed.
    """
    if task not in _RENDERERS:
        raise ValueError(f"Unknown zoo task {task!r}; the tasks are {', '.join(TASKS)}.")
    return _RENDERERS[task](_rng(seed, task, stream, index))


def make_object_caption_sample(index: int, seed: int = 0) -> Sample:
    """A pre-training warm-up item: one shape of any size (30-90 px) anywhere, captioned by colour and shape.

    Small objects fill one or two of the 16 image tokens, and a model from scratch plateaus long before it
    learns to look at them; large ones fill most tokens and are learnt within tens of steps, after which
    the small ones follow (measured: colour accuracy on 28 px objects after 200 steps, 0.14 without these
    items, 0.69 with them).
    """
    rng = _rng(seed, "objects", "pretrain", index)
    image, draw = _canvas()
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    size = rng.uniform(30, 90)
    cx, cy = rng.uniform(size / 2, IMAGE_SIZE - size / 2), rng.uniform(size / 2, IMAGE_SIZE - size / 2)
    _draw_shape(draw, shape, cx, cy, size, COLORS[color])
    caption = f"{_article(color)} {color} {shape}."
    return Sample(image, CAPTION_PROMPT, caption, [caption], caption=caption)


def make_caption_sample(task: str, index: int, seed: int = 0) -> Sample:
    """A pre-training item: an image of ``task``'s kind whose target is its caption."""
    sample = make_sample(task, "pretrain", index, seed)
    return Sample(sample.image, CAPTION_PROMPT, sample.caption, [sample.caption])


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG bytes (how the ``image`` column stores it)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def vocabulary_text() -> str:
    """Every word any prompt, question, answer or caption can contain (the tokenizer is built from it)."""
    parts = [CAPTION_PROMPT, *PROMPTS.values(), "You are a helpful assistant.", "system user assistant"]
    parts += list(COLORS) + list(SHAPES) + list(POSITIONS) + list(POLYGONS.values()) + list(ANGLE_TYPES)
    parts += list(INK) + list(BAR_LABELS) + list(OCR_WORDS)
    parts += [
        "What color is the ? What shape is the object? How many objects are there? Is there a yes no",
        "Question: How many sides does the polygon have? What type of angle is shown? Choices:",
        "Which bar is the tallest? Which bar is the shortest? What is the value of bar",
        "What word is written at the top bottom in ? above",
        "a an the at in and bar chart with drawn written number angle",
    ]
    return " ".join(parts)

