"""Small synthetic image, video and audio tasks, to run the evaluation pipeline end to end on any model.

They check the plumbing -- data layouts, processors, generation, scoring, reports -- not a model's skill: a tiny
random model scores near chance. :func:`write_synthetic_tasks` writes, under ``OUT``:

- suite ``OUT/image.yaml``: ``image_colour`` -- colour of a square; Parquet of HF Image structs; ``vqa_accuracy``.
- suite ``OUT/video.yaml``: ``video_colour`` -- colour of a moving square; Parquet, a list of PNG structs per
  video (6 frames, 4 sampled); ``multiple_choice`` over the closed answer set. ``video_direction`` -- left,
  right, up or down; JSONL, a list of PNG paths per video (4 frames); ``multiple_choice`` with 4 options.
- suite ``OUT/audio.yaml``: ``audio_pitch`` -- a 0.5 s tone of 300 Hz is low, of 2 kHz high; Parquet of HF
  Audio structs holding 16 kHz WAV bytes; ``multiple_choice`` with 2 options. ``audio_beeps`` -- 1-3 beeps of
  1 kHz in 0.8 s, answered by their number; JSONL of ``{array, sampling_rate}`` at 8 kHz; ``vqa_accuracy``.

Suite paths are relative: evaluate with ``--data-root OUT``. Run ``python -m omnimerge.engine.evaluation.synthetic
OUT [--samples N]``. Everything is seeded: the same arguments write the same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
from pathlib import Path
from typing import Any

from .media import encode_wav

__all__ = ["COLOURS", "DIRECTIONS", "SYNTHETIC_SUITES", "write_synthetic_tasks", "tone"]

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 60, 230), "yellow": (240, 220, 20)}
DIRECTIONS = ("left", "right", "up", "down")
FRAME_SIZE = 32
SQUARE = 10
AUDIO_RATE, BEEP_RATE = 16000, 8000
LOW_HZ, HIGH_HZ, BEEP_HZ = 300.0, 2000.0, 1000.0

LETTER_PROMPT = "{question}\n{choices}\nAnswer with the option's letter from the given choices directly."
SYNTHETIC_SUITES: dict[str, dict[str, Any]] = {
    "image": {"name": "synthetic_image", "description": "colour of a square (image)", "tasks": [
        {"name": "image_colour", "capability": "Image", "modality": "image", "path": "image_colour",
         "metric": "vqa_accuracy", "max_new_tokens": 3},
    ]},
    "video": {"name": "synthetic_video", "description": "colour and direction of a moving square (video)", "tasks": [
        {"name": "video_colour", "capability": "Video", "modality": "video", "path": "video_colour", "num_frames": 4,
         "metric": "multiple_choice", "max_new_tokens": 3},
        {"name": "video_direction", "capability": "Video", "modality": "video", "path": "video_direction",
         "metric": "multiple_choice", "max_new_tokens": 3, "prompt_with_choices": LETTER_PROMPT},
    ]},
    "audio": {"name": "synthetic_audio", "description": "pitch of a tone and number of beeps (audio)", "tasks": [
        {"name": "audio_pitch", "capability": "Audio", "modality": "audio", "path": "audio_pitch",
         "metric": "multiple_choice", "max_new_tokens": 3, "prompt_with_choices": LETTER_PROMPT},
        {"name": "audio_beeps", "capability": "Audio", "modality": "audio", "path": "audio_beeps",
         "metric": "vqa_accuracy", "max_new_tokens": 3},
    ]},
}  # fmt: skip


def _png(colour: tuple[int, int, int], x: int, y: int) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (FRAME_SIZE, FRAME_SIZE), (0, 0, 0))
    ImageDraw.Draw(image).rectangle([x, y, x + SQUARE - 1, y + SQUARE - 1], fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _path(direction: str, frames: int) -> list[tuple[int, int]]:
    """Top-left corners of a square crossing the frame in ``direction`` over ``frames`` frames."""
    span = FRAME_SIZE - SQUARE
    steps = [round(span * k / (frames - 1)) for k in range(frames)]
    middle = span // 2
    return {
        "right": [(s, middle) for s in steps],
        "left": [(span - s, middle) for s in steps],
        "down": [(middle, s) for s in steps],
        "up": [(middle, span - s) for s in steps],
    }[direction]


def tone(hz: float, seconds: float, rate: int, amplitude: float = 0.5) -> list[float]:
    """``amplitude · sin(2π · hz · t)`` sampled at ``rate`` for ``seconds``."""
    return [amplitude * math.sin(2 * math.pi * hz * i / rate) for i in range(int(round(seconds * rate)))]


def _beeps(count: int, rate: int) -> list[float]:
    """``count`` beeps of 0.1 s at ``BEEP_HZ``, each followed by 0.1 s of silence, in 0.8 s."""
    silence = [0.0] * int(0.1 * rate)
    wave: list[float] = []
    for _ in range(count):
        wave += tone(BEEP_HZ, 0.1, rate) + silence
    return wave + [0.0] * (int(0.8 * rate) - len(wave))


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _image_rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        colour = rng.choice(sorted(COLOURS))
        x, y = rng.randrange(FRAME_SIZE - SQUARE), rng.randrange(FRAME_SIZE - SQUARE)
        rows.append({"question_id": f"image_colour_{i}", "image": {"bytes": _png(COLOURS[colour], x, y), "path": None},
                     "question": "what colour is the square ?", "answers": [colour]})  # fmt: skip
    return rows


def _video_colour_rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        colour = rng.choice(sorted(COLOURS))
        corners = _path(rng.choice(DIRECTIONS), 6)
        frames = [{"bytes": _png(COLOURS[colour], x, y), "path": None} for x, y in corners]
        rows.append({"question_id": f"video_colour_{i}", "video": frames,
                     "question": "what colour is the square in the video ?", "answers": [colour]})  # fmt: skip
    return rows


def _video_direction_rows(rng: random.Random, n: int, folder: Path) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        direction = rng.choice(DIRECTIONS)
        colour = COLOURS[rng.choice(sorted(COLOURS))]
        paths = []
        for k, (x, y) in enumerate(_path(direction, 4)):
            relative = Path("frames") / f"video_direction_{i}" / f"{k:03d}.png"
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).write_bytes(_png(colour, x, y))
            paths.append(relative.as_posix())
        rows.append({"question_id": f"video_direction_{i}", "video": paths,
                     "question": "which direction does the square move ?", "choices": list(DIRECTIONS),
                     "answers": [direction]})  # fmt: skip
    return rows


def _audio_pitch_rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        pitch = rng.choice(("high", "low"))
        wav = encode_wav(tone(HIGH_HZ if pitch == "high" else LOW_HZ, 0.5, AUDIO_RATE), AUDIO_RATE)
        rows.append({"question_id": f"audio_pitch_{i}", "audio": {"bytes": wav, "path": None},
                     "question": "is the tone high or low ?", "choices": ["high", "low"],
                     "answers": [pitch]})  # fmt: skip
    return rows


def _audio_beeps_rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        count = rng.randint(1, 3)
        wave = [round(v, 5) for v in _beeps(count, BEEP_RATE)]
        rows.append({"question_id": f"audio_beeps_{i}", "audio": {"array": wave, "sampling_rate": BEEP_RATE},
                     "question": "how many beeps do you hear ?", "answers": [str(count)]})  # fmt: skip
    return rows


def write_synthetic_tasks(out_dir: str | Path, *, samples: int = 4, seed: int = 0) -> dict[str, Path]:
    """Write the synthetic tasks' data and one suite file per modality (module docstring).

    Args:
        out_dir: Folder to write into (created); it is the data root of the suites.
        samples: Samples per task.
        seed: Seeds colours, positions, directions, pitches and beep counts.

    Returns:
        Modality (``image``, ``video``, ``audio``) → its suite file.
    """
    import yaml

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    _write_parquet(out / "image_colour" / "test.parquet", _image_rows(rng, samples))
    _write_parquet(out / "video_colour" / "test.parquet", _video_colour_rows(rng, samples))
    _write_jsonl(out / "video_direction" / "test.jsonl", _video_direction_rows(rng, samples, out / "video_direction"))
    _write_parquet(out / "audio_pitch" / "test.parquet", _audio_pitch_rows(rng, samples))
    _write_jsonl(out / "audio_beeps" / "test.jsonl", _audio_beeps_rows(rng, samples))
    suites = {}
    for modality, suite in SYNTHETIC_SUITES.items():
        suites[modality] = out / f"{modality}.yaml"
        suites[modality].write_text(yaml.safe_dump(suite, sort_keys=False))
    return suites


def main(argv: list[str] | None = None) -> int:
    """``python -m omnimerge.engine.evaluation.synthetic OUT [--samples N] [--seed S]``."""
    parser = argparse.ArgumentParser(description="Write the synthetic image/video/audio tasks and their suites.")
    parser.add_argument("out", help="output folder (the suites' data root)")
    parser.add_argument("--samples", type=int, default=4, help="samples per task (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for modality, path in write_synthetic_tasks(args.out, samples=args.samples, seed=args.seed).items():
        print(f"{modality}\t{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
