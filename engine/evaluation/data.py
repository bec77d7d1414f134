"""Local task data: find a task's files, check them, and read them as samples.

Layouts found under a task's directory ``D`` for split ``S`` (first match wins), which cover the zoo and the
public toolkits' Hugging Face datasets:

1. ``D`` itself is a ``.parquet`` / ``.jsonl`` / ``.arrow`` file;
2. ``D/S.parquet``, ``D/S-*.parquet``, ``D/data/S-*.parquet`` (a hub snapshot);
3. ``D/S/state.json`` or ``D/state.json`` (``datasets.save_to_disk``; its Arrow stream files are read with
   pyarrow, ``datasets`` is not needed);
4. ``D/S.jsonl``.

Rows become :class:`Sample` objects through the task's column mapping (``suites.TaskSpec``). The input the
task's ``modality`` names is read from its field: ``image`` (an HF Image struct ``{bytes, path}``, raw bytes, or a
path relative to the data file), ``video`` (a list of such frames, or a folder of frame images) or ``audio`` (WAV
bytes or file, or a float array with its sampling rate); ``media`` lists every accepted value.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from omnimerge.engine.errors import EvaluationError

from .media import Audio, audio_clip, image_bytes, video_frames
from .suites import CANONICAL_FIELDS, Suite, TaskSpec

__all__ = ["Sample", "DataFiles", "find_data_files", "check_task_data", "check_suite_data", "iter_samples"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One evaluation item in canonical form (``width``/``height`` may be filled from the image later).

    ``video`` holds a video task's frames (encoded images, in order), ``audio`` an audio task's waveform.
    """

    question_id: str
    question: str
    answers: tuple[str, ...]
    image: bytes | None
    choices: tuple[str, ...] = ()
    bbox: tuple[float, float, float, float] | None = None
    width: float | None = None
    height: float | None = None
    category: str | None = None
    video: tuple[bytes, ...] | None = None
    audio: Audio | None = field(default=None, compare=False)


@dataclass(frozen=True)
class DataFiles:
    """The files holding one task's split: ``kind`` is ``parquet``, ``arrow`` (stream) or ``jsonl``."""

    kind: str
    files: tuple[Path, ...]


_PARQUET_PATTERNS = ("{split}.parquet", "{split}-*.parquet", "data/{split}-*.parquet")
_STATE_FILES = ("{split}/state.json", "state.json")


def _searched(split: str) -> list[str]:
    return [p.format(split=split) for p in (*_PARQUET_PATTERNS, *_STATE_FILES, "{split}.jsonl")]


def _arrow_files(state_json: Path) -> DataFiles:
    state = json.loads(state_json.read_text())
    names = [entry["filename"] for entry in state.get("_data_files", [])]
    return DataFiles("arrow", tuple(state_json.parent / n for n in names))


def find_data_files(directory: Path, split: str) -> DataFiles | None:
    """Locate a split's files under ``directory`` (module docstring for the layouts), or ``None``."""
    if directory.is_file():
        kind = {".parquet": "parquet", ".jsonl": "jsonl", ".arrow": "arrow"}.get(directory.suffix)
        return DataFiles(kind, (directory,)) if kind else None
    if not directory.is_dir():
        return None
    for pattern in _PARQUET_PATTERNS:
        found = sorted(directory.glob(pattern.format(split=split)))
        if found:
            return DataFiles("parquet", tuple(found))
    for state_file in _STATE_FILES:
        state = directory / state_file.format(split=split)
        if state.is_file():
            return _arrow_files(state)
    if (directory / f"{split}.jsonl").is_file():
        return DataFiles("jsonl", (directory / f"{split}.jsonl",))
    return None


def _schema_names(data: DataFiles) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = data.files[0]
    if data.kind == "parquet":
        return list(pq.read_schema(first).names)
    if data.kind == "arrow":
        with pa.memory_map(str(first)) as source:
            return list(pa.ipc.open_stream(source).schema.names)
    with first.open() as handle:
        line = next((ln for ln in handle if ln.strip()), "{}")
    return list(json.loads(line))


def _required_fields(task: TaskSpec) -> list[str]:
    from .metrics import get_metric

    needs = [n for n in get_metric(task.metric).needs if n not in ("width", "height")]
    fields = [task.modality, "question", *needs]
    return fields + [f for f in task.columns if f not in fields]


def _download_hint(task: TaskSpec, directory: Path) -> str:
    if not task.dataset:
        return f"Put the data for split '{task.split}' there."
    return (
        f"Download '{task.dataset}' there, e.g. `hf download {task.dataset} --repo-type dataset "
        f"--local-dir {directory}` (or point the suite's 'path' at an existing copy)."
    )


def check_task_data(task: TaskSpec, data_root: str | Path | None) -> list[str]:
    """What is missing for one task: no files, or columns the mapping needs that the data lacks."""
    directory = task.data_path(data_root)
    data = find_data_files(directory, task.split)
    label = f"task '{task.name}'" + (f" ({task.dataset}, split {task.split})" if task.dataset else "")
    if data is None or not data.files:
        looked = ", ".join(_searched(task.split))
        return [f"{label}: no data at {directory} (looked for {looked}). {_download_hint(task, directory)}"]
    missing_files = [str(f) for f in data.files if not f.is_file()]
    if missing_files:
        return [f"{label}: listed data files are missing: {', '.join(missing_files)}. Copy the dataset again."]
    names = set(_schema_names(data))
    problems = []
    for name in _required_fields(task):
        column = task.column(name).split(".")[0]
        if column not in names and not (name == "image" and task.images_from):
            problems.append(
                f"{label}: field '{name}' needs column '{column}', which {data.files[0]} lacks "
                f"(columns: {', '.join(sorted(names))}). Map it with `columns: {{{name}: <column>}}` in the suite."
            )
    if task.images_from:
        problems += check_task_data(_images_task(task), data_root)
    return problems


def check_suite_data(suite: Suite, data_root: str | Path | None) -> list[str]:
    """Every problem with a suite's local data, one line each (empty: every task can run).

    Args:
        suite: The suite to check.
        data_root: Folder that relative task paths live under.

    Returns:
        One message per problem, naming the task, the dataset, the path looked at and the fix.
    """
    return [problem for task in suite.tasks for problem in check_task_data(task, data_root)]


def _images_task(task: TaskSpec) -> TaskSpec:
    spec = dict(task.images_from or {})
    column = spec.get("image_column", "image")
    key = spec.get("id_column", "id")
    # Reuse the checker and reader: the images table is a task whose 'question' is its id column.
    return TaskSpec(name=f"{task.name}:images", metric="exact_match_gqa", path=spec["path"],
                    split=spec.get("split", task.split), dataset=spec.get("dataset", task.dataset),
                    columns={"image": column, "question": key, "answers": key})  # fmt: skip


def _record_batches(data: DataFiles, columns: list[str]) -> Iterator[list[dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    for path in data.files:
        if data.kind == "parquet":
            parquet = pq.ParquetFile(path)
            present = [c for c in columns if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=256, columns=present):
                yield batch.to_pylist()
        elif data.kind == "arrow":
            with pa.memory_map(str(path)) as source:
                for batch in pa.ipc.open_stream(source):
                    present = [c for c in columns if c in batch.schema.names]
                    yield batch.select(present).to_pylist()
        else:
            rows = pajson.read_json(path).to_pylist() if path.stat().st_size else []
            yield [{c: row.get(c) for c in columns if c in row} for row in rows]


def _lookup(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit():
            value = value[int(part)] if int(part) < len(value) else None
        else:
            return None
    return value


def _as_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, dict):
        return (str(value.get("answer", "")),)
    if isinstance(value, (list, tuple)):
        return tuple(s for item in value for s in _as_strings(item))
    return (str(value),)


def _matches(value: Any, flt: dict[str, Any]) -> bool:
    text = "" if value is None else str(value)
    if "equals" in flt:
        return text == str(flt["equals"])
    if "in" in flt:
        return text in {str(v) for v in flt["in"]}
    return str(flt["contains"]).lower() in text.lower()


def _load_images(task: TaskSpec, data_root: str | Path | None) -> dict[str, bytes | None]:
    images_task = _images_task(task)
    return {s.question: s.image for s in iter_samples(images_task, data_root)}


def _row_samples(task: TaskSpec, row: dict[str, Any], index: int, base: Path, images: dict | None) -> list[Sample]:
    get = lambda name: _lookup(row, task.column(name))  # noqa: E731
    qid = get("question_id")
    qid = str(index) if qid is None else str(qid)
    where = f"sample '{qid}' of task '{task.name}'"
    image = video = audio = None
    if task.modality == "video":
        video = video_frames(get("video"), base, where)
    elif task.modality == "audio":
        audio = audio_clip(get("audio"), base, where, get("sampling_rate"))
    elif images is not None:
        image = images.get(str(_lookup(row, task.images_from["key"])))
    else:
        image = image_bytes(get("image"), base)
    bbox = get("bbox")
    common = dict(
        image=image,
        video=video,
        audio=audio,
        choices=_as_strings(get("choices")),
        bbox=tuple(float(v) for v in bbox) if bbox is not None else None,
        width=float(get("width")) if get("width") is not None else None,
        height=float(get("height")) if get("height") is not None else None,
        category=None if get("category") is None else str(get("category")),
    )
    if not task.explode:
        return [Sample(question_id=qid, question=str(get("question") or ""), answers=_as_strings(get("answers")),
                       **common)]  # fmt: skip
    questions, answers = list(get("question") or []), list(get("answers") or [])
    return [
        Sample(question_id=f"{qid}_{i}", question=str(q), answers=_as_strings(a), **common)
        for i, (q, a) in enumerate(zip(questions, answers))
    ]


def iter_samples(task: TaskSpec, data_root: str | Path | None, *, limit: int | None = None) -> Iterator[Sample]:
    """Read a task's samples in file order, after the column mapping, ``filter`` and ``explode``.

    Args:
        task: The task.
        data_root: Folder that relative task paths live under.
        limit: Stop after this many samples (``None``: all).

    Raises:
        EvaluationError: The data is missing or lacks a needed column (the message says what and where).
    """
    problems = check_task_data(task, data_root)
    if problems:
        raise EvaluationError("\n".join(problems))
    directory = task.data_path(data_root)
    data = find_data_files(directory, task.split)
    if data is None:  # removed between the check and the read
        raise EvaluationError(f"Data of task '{task.name}' vanished from {directory} while reading; copy it again.")
    columns = sorted({task.column(f).split(".")[0] for f in CANONICAL_FIELDS})
    if task.images_from:
        columns.append(task.images_from["key"])
    images = _load_images(task, data_root) if task.images_from else None
    index = produced = 0
    for rows in _record_batches(data, columns):
        for row in rows:
            for sample in _row_samples(task, row, index, data.files[0].parent, images):
                if task.filter and not _matches(getattr(sample, task.filter["field"], None), task.filter):
                    continue
                yield sample
                produced += 1
                if limit is not None and produced >= limit:
                    return
            index += 1
