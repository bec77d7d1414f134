"""Task suites as data: YAML files naming each task's dataset, split, columns, prompt, metric and box format.

A suite file looks like this (``benchmarks/suites/paper_qwen2vl.yaml`` is the paper's ten columns)::

    name: paper_qwen2vl
    description: ...
    defaults: {max_new_tokens: 16, box_format: model, split: test}
    tasks:
      - name: chartqa
        capability: Chart
        dataset: lmms-lab/ChartQA          # the id the public toolkits load
        path: chartqa                      # local copy, relative to the data root (or absolute)
        split: test
        columns: {answers: answer}         # canonical field -> column in the data (dotted for structs)
        prompt: "{question}\\nAnswer the question using a single word or phrase."
        metric: relaxed_accuracy
        lmms_eval_task: chartqa            # optional: the task name for the lmms-eval backend

Canonical fields: ``question_id``, ``image``, ``video``, ``audio``, ``sampling_rate``, ``question``, ``answers``,
``choices``, ``bbox``, ``width``, ``height``, ``category``; an unmapped field reads the column of the same name
when it exists. ``modality`` (``image`` by default, ``video`` or ``audio``) says which input a task feeds the
model (``media`` for the values each may hold); a video task may set ``num_frames`` (frames sampled evenly from
each video; default: all). Optional per task: ``prompt_with_choices`` (used for samples that have choices),
``filter`` (``{field, equals | in |
contains}``), ``explode: true`` (``question`` and ``answers`` are parallel lists, one sample per pair) and
``images_from`` (``{path, split, key, id_column, image_column}``: images kept in a second table, GQA-style).

A user suite is a single Parquet/JSONL file plus a metric name (:func:`load_suite` with ``metric=``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from omnimerge.engine.errors import EvaluationError

from .boxes import BOX_FORMATS
from .media import MODALITIES
from .metrics import METRICS

__all__ = [
    "CANONICAL_FIELDS",
    "CAPABILITY_ORDER",
    "TaskSpec",
    "Suite",
    "load_suite",
    "builtin_suites",
    "parse_suite",
]

CANONICAL_FIELDS = ("question_id", "image", "video", "audio", "sampling_rate", "question", "answers", "choices",
                    "bbox", "width", "height", "category")  # fmt: skip
# The paper's column groups, in its table order; other capabilities follow in suite order.
CAPABILITY_ORDER = ("VQA", "Geometry", "Chart", "OCR", "Grounding")
SHORT_ANSWER_PROMPT = "{question}\nAnswer the question using a single word or phrase."


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task of a suite (module docstring for the YAML keys)."""

    name: str
    metric: str
    path: str
    capability: str = "Custom"
    dataset: str = ""
    split: str = "test"
    columns: Mapping[str, str] = field(default_factory=dict)
    prompt: str = SHORT_ANSWER_PROMPT
    prompt_with_choices: str | None = None
    max_new_tokens: int = 32
    box_format: str = "model"
    filter: Mapping[str, Any] | None = None
    explode: bool = False
    images_from: Mapping[str, str] | None = None
    lmms_eval_task: str | None = None
    modality: str = "image"
    num_frames: int | None = None

    def column(self, canonical: str) -> str:
        """The data column (possibly dotted) that holds a canonical field."""
        return self.columns.get(canonical, canonical)

    def data_path(self, data_root: str | Path | None) -> Path:
        """Where this task's local copy lives: ``path`` if absolute, else under ``data_root``."""
        path = Path(self.path).expanduser()
        if path.is_absolute() or data_root is None:
            return path
        return Path(data_root).expanduser() / path


_TASK_FIELDS = {f.name: f for f in dataclasses.fields(TaskSpec)}
_REQUIRED = ("name", "metric", "path")
_FILTER_OPS = ("equals", "in", "contains")


@dataclass(frozen=True)
class Suite:
    """A named list of tasks, read from a YAML file (or made from one user data file)."""

    name: str
    tasks: tuple[TaskSpec, ...]
    description: str = ""
    source: str = ""

    def task(self, name: str) -> TaskSpec:
        """The task called ``name``; ``KeyError`` naming the suite's tasks otherwise."""
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"Suite '{self.name}' has no task '{name}'; its tasks: {', '.join(t.name for t in self.tasks)}.")

    def capabilities(self) -> list[str]:
        """Capabilities of the suite's tasks: the paper's order first, then any others in suite order."""
        present = list(dict.fromkeys(t.capability for t in self.tasks))
        return [c for c in CAPABILITY_ORDER if c in present] + [c for c in present if c not in CAPABILITY_ORDER]


def _task_problems(where: str, raw: Mapping[str, Any]) -> list[str]:
    problems = [f"{where}: unknown key '{k}' (known: {', '.join(_TASK_FIELDS)})" for k in raw if k not in _TASK_FIELDS]
    problems += [f"{where}: missing '{k}'" for k in _REQUIRED if not raw.get(k)]
    metric = raw.get("metric")
    if metric and metric not in METRICS:
        close = difflib.get_close_matches(str(metric), METRICS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        problems.append(f"{where}: unknown metric '{metric}'{hint}; known: {', '.join(sorted(METRICS))}")
    box_format = raw.get("box_format", "model")
    if box_format not in (*BOX_FORMATS, "auto", "model"):
        problems.append(f"{where}: unknown box_format '{box_format}'; known: {', '.join(BOX_FORMATS)}, auto, model")
    columns = raw.get("columns") or {}
    if not isinstance(columns, Mapping):
        problems.append(f"{where}: 'columns' must map canonical fields to data columns")
    else:
        problems += [
            f"{where}: column mapping names unknown field '{k}' (fields: {', '.join(CANONICAL_FIELDS)})"
            for k in columns
            if k not in CANONICAL_FIELDS
        ]
    max_new = raw.get("max_new_tokens", 1)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        problems.append(f"{where}: max_new_tokens must be a positive integer, got {max_new!r}")
    flt = raw.get("filter")
    if flt is not None and (
        not isinstance(flt, Mapping) or "field" not in flt or sum(op in flt for op in _FILTER_OPS) != 1
    ):
        problems.append(f"{where}: filter must be {{field: F, equals|in|contains: V}} with exactly one operator")
    elif flt is not None and flt["field"] not in CANONICAL_FIELDS:
        problems.append(f"{where}: filter field '{flt['field']}' is not one of {', '.join(CANONICAL_FIELDS)}")
    images_from = raw.get("images_from")
    if images_from is not None and (not isinstance(images_from, Mapping) or not {"path", "key"} <= set(images_from)):
        problems.append(f"{where}: images_from needs at least 'path' and 'key' (the column holding the image id)")
    modality = raw.get("modality", "image")
    if modality not in MODALITIES:
        problems.append(f"{where}: unknown modality '{modality}'; known: {', '.join(MODALITIES)}")
    elif images_from is not None and modality != "image":
        problems.append(f"{where}: images_from is for image tasks, but the task's modality is '{modality}'")
    num_frames = raw.get("num_frames")
    if num_frames is not None and (not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1):
        problems.append(f"{where}: num_frames must be a positive integer, got {num_frames!r}")
    elif num_frames is not None and modality != "video":
        problems.append(f"{where}: num_frames is for video tasks, but the task's modality is '{modality}'")
    for template_key in ("prompt", "prompt_with_choices"):
        template = raw.get(template_key)
        if template is not None and "{question}" not in str(template):
            problems.append(f"{where}: {template_key} must contain '{{question}}'")
    return problems


def parse_suite(data: Mapping[str, Any], *, source: str = "<memory>") -> Suite:
    """Build and validate a suite from parsed YAML; every problem is reported at once.

    Raises:
        EvaluationError: The suite is invalid; the message lists each problem with its task.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("tasks"), list) or not data["tasks"]:
        raise EvaluationError(f"Suite file '{source}' must be a mapping with a non-empty 'tasks' list.")
    defaults = dict(data.get("defaults") or {})
    problems: list[str] = []
    tasks: list[TaskSpec] = []
    seen: set[str] = set()
    for i, raw_task in enumerate(data["tasks"]):
        raw = {**defaults, **(raw_task or {})}
        where = f"task {i} '{raw.get('name', '?')}'"
        task_problems = _task_problems(where, raw)
        if raw.get("name") in seen:
            task_problems.append(f"{where}: duplicate task name")
        seen.add(raw.get("name"))
        problems += task_problems
        if not task_problems:
            raw["columns"] = dict(raw.get("columns") or {})
            tasks.append(TaskSpec(**raw))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise EvaluationError(f"Suite '{source}' has {len(problems)} problem(s); fix them in the file:\n{lines}")
    return Suite(
        name=str(data.get("name") or Path(source).stem),
        tasks=tuple(tasks),
        description=str(data.get("description") or ""),
        source=source,
    )


def _suites_folder() -> Any:
    return importlib.resources.files("omnimerge.benchmarks").joinpath("suites")


def builtin_suites() -> list[str]:
    """Names of the suites shipped in ``omnimerge.benchmarks`` (folder ``benchmarks/suites/``)."""
    folder = _suites_folder()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _user_data_suite(path: Path, metric: str | None, **task_overrides: Any) -> Suite:
    if not metric:
        raise EvaluationError(
            f"Suite file '{path}' is a data file; say how to score it with a metric name "
            f"(--metric NAME or metric=...). Known metrics: {', '.join(sorted(METRICS))}."
        )
    raw = {"name": path.stem, "metric": metric, "path": str(path.resolve()), **task_overrides}
    return parse_suite({"name": path.stem, "tasks": [raw]}, source=str(path))


def _read_yaml(name_or_path: str | Path) -> tuple[dict[str, Any], str] | None:
    """Raw YAML of a suite file or a built-in suite name, with its source label; ``None`` if neither."""
    import yaml

    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise EvaluationError(f"Suite file '{path}' does not exist; give an existing YAML file or a suite name.")
        return yaml.safe_load(path.read_text()) or {}, str(path)
    resource = _suites_folder().joinpath(f"{name_or_path}.yaml")
    if resource.is_file():
        return yaml.safe_load(resource.read_text()) or {}, f"builtin:{name_or_path}"
    return None


def _resolve_extends(data: dict[str, Any], source: str, depth: int = 0) -> dict[str, Any]:
    """Apply ``extends: PARENT`` (a suite name or file): parent tasks with ``defaults`` and ``overrides`` on top."""
    parent_name = data.get("extends")
    if not parent_name:
        return data
    if depth > 4:
        raise EvaluationError(f"Suite '{source}' extends suites more than 4 levels deep; flatten the chain.")
    parent_ref = Path(str(parent_name))
    if parent_ref.suffix in (".yaml", ".yml") and not parent_ref.is_absolute() and not source.startswith("builtin:"):
        parent_ref = Path(source).parent / parent_ref
    found = _read_yaml(parent_ref if parent_ref.suffix else str(parent_name))
    if found is None:
        raise EvaluationError(
            f"Suite '{source}' extends '{parent_name}', which is neither a file nor a built-in suite."
        )
    parent = _resolve_extends(*found, depth=depth + 1)
    overrides = data.get("overrides") or {}
    unknown = sorted(set(overrides) - {t.get("name") for t in parent.get("tasks", [])})
    if unknown:
        raise EvaluationError(
            f"Suite '{source}' overrides tasks its parent '{parent_name}' lacks: {', '.join(unknown)}."
        )
    tasks = data.get("tasks") or [{**t, **(overrides.get(t.get("name")) or {})} for t in parent.get("tasks", [])]
    merged = {**parent, **{k: v for k, v in data.items() if k not in ("extends", "overrides")}, "tasks": tasks}
    merged["defaults"] = {**(parent.get("defaults") or {}), **(data.get("defaults") or {})}
    return merged


def load_suite(name_or_path: str | Path | Suite, *, metric: str | None = None, **task_overrides: Any) -> Suite:
    """Find and load a suite.

    Args:
        name_or_path: A built-in suite name (``paper_qwen2vl``, ``zoo``, ...), a YAML file, or a user data file
            (``.jsonl``, ``.parquet``) with the canonical columns. A ``Suite`` is returned as is.
        metric: For a user data file: the metric that scores it (required there, ignored otherwise).
        **task_overrides: For a user data file: other task keys (``prompt``, ``max_new_tokens``, ...).

    Raises:
        EvaluationError: Unknown suite (the message lists the built-in ones), or an invalid suite file.
    """
    if isinstance(name_or_path, Suite):
        return name_or_path
    path = Path(name_or_path).expanduser()
    if path.suffix in (".jsonl", ".parquet") and path.is_file():
        return _user_data_suite(path, metric, **task_overrides)
    found = _read_yaml(name_or_path)
    if found is not None:
        data, source = found
        return parse_suite(_resolve_extends(data, source), source=source)
    known = builtin_suites()
    close = difflib.get_close_matches(str(name_or_path), known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise EvaluationError(
        f"Unknown suite '{name_or_path}'.{hint} Built-in suites: {', '.join(known) or 'none'}; "
        "or give a YAML suite file, or a .jsonl/.parquet data file with --metric."
    )
