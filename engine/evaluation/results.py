"""The results table (Parquet) and the per-sample predictions beside it.

Layout of a results directory::

    results.parquet                      one row per (model, task, metric): RESULT_COLUMNS
    predictions/<model>/<task>.jsonl     every sample: prompt, prediction, references, extracted answer, score
    predictions/<model>/<task>.score.json   the task's rows, written last: the task is done

Writing happens in stages, so a crash leaves nothing half-written: a worker writes a task's predictions and
then its ``.score.json`` (each to a temporary name, then renamed); only the driver writes
``results.parquet``, folding in every finished task (:meth:`ResultsStore.commit`). A rerun skips the
(model, task) pairs already in the table or already finished on disk.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from omnimerge.engine.errors import EvaluationError

__all__ = [
    "RESULT_COLUMNS",
    "ROLES",
    "MANIFEST_FILE",
    "ModelEntry",
    "model_entry",
    "ResultsStore",
    "evaluator_version",
    "read_predictions",
    "result_row",
]

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ("model", "role", "recipe_id", "task", "capability", "metric", "value", "samples", "settings",
                  "seconds", "evaluator_version", "timestamp")  # fmt: skip
# Row order of the report; "model" is an unlabelled model.
ROLES = ("base", "expert", "merged", "model")
MANIFEST_FILE = "omnimerge_manifest.json"  # written by the merge engine into every merged model
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def evaluator_version() -> str:
    """``<omnimerge version>/eval1``: the package version and the evaluation format's own version."""
    from omnimerge.engine.version import omnimerge_version

    return f"{omnimerge_version()}/eval1"


@dataclass(frozen=True)
class ModelEntry:
    """A model to evaluate: a name (file-safe: it names a predictions folder), a checkpoint, its role.

    Attributes:
        name: Row label in the results and the report.
        path: Checkpoint directory.
        role: ``base``, ``expert``, ``merged`` or ``model`` (unknown).
        recipe_id: The merge recipe's digest for merged models (from the manifest), else empty.
    """

    name: str
    path: str
    role: str = "model"
    recipe_id: str = ""

    def __post_init__(self) -> None:
        if not _SAFE_NAME.match(self.name):
            raise EvaluationError(
                f"Model name '{self.name}' (for {self.path}) cannot name a predictions folder; use letters, digits "
                "and . _ + - only, e.g. NAME=PATH on the command line."
            )
        if self.role not in ROLES:
            raise EvaluationError(f"Model '{self.name}' has role '{self.role}'; roles are {', '.join(ROLES)}.")


def model_entry(spec: str | Path | ModelEntry, *, role: str | None = None) -> ModelEntry:
    """A ``ModelEntry`` from ``PATH`` or ``NAME=PATH``, labelled by the merge manifest when there is one.

    A directory with ``omnimerge_manifest.json`` is ``merged`` (or the manifest's ``role``) with the
    manifest's ``recipe_id`` / ``recipe_digest``; an explicit ``role`` wins. The name defaults to the
    directory's name.
    """
    if isinstance(spec, ModelEntry):
        return spec if role is None else ModelEntry(spec.name, spec.path, role, spec.recipe_id)
    text = str(spec)
    name, sep, path_text = text.partition("=")
    if not sep or "/" in name or not name:
        name, path_text = "", text
    path = Path(path_text).expanduser()
    manifest_path = path / MANIFEST_FILE
    found_role, recipe_id = "model", ""
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise EvaluationError(f"Manifest '{manifest_path}' is not valid JSON ({error}); rewrite or delete it.")
        found_role = str(manifest.get("role", "merged"))
        recipe_id = str(manifest.get("recipe_id") or manifest.get("recipe_digest") or "")
    return ModelEntry(name or path.resolve().name, str(path), role or found_role, recipe_id)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Every sample record of one ``predictions/<model>/<task>.jsonl`` file."""
    with Path(path).open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


class ResultsStore:
    """One results directory (module docstring): finished tasks on disk, and the table that gathers them."""

    def __init__(self, results_dir: str | Path) -> None:
        self.root = Path(results_dir).expanduser()
        self.table_path = self.root / "results.parquet"

    def predictions_path(self, model: str, task: str) -> Path:
        """Where a (model, task)'s per-sample predictions live."""
        return self.root / "predictions" / model / f"{task}.jsonl"

    def _score_path(self, model: str, task: str) -> Path:
        return self.root / "predictions" / model / f"{task}.score.json"

    def record_task(self, model: str, task: str, rows: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> None:
        """Worker side: write a task's predictions, then its rows; from then on the task counts as done."""
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
        _atomic_write(self.predictions_path(model, task), lines.encode())
        _atomic_write(self._score_path(model, task), json.dumps(rows, indent=1).encode())

    def finished_rows(self) -> list[dict[str, Any]]:
        """Rows of every task finished on disk (``.score.json`` files), committed or not."""
        rows: list[dict[str, Any]] = []
        paths = (self.root / "predictions").glob("*/*.score.json")
        for path in sorted(paths, key=lambda p: (p.stat().st_mtime_ns, str(p))):  # in the order they finished
            rows += json.loads(path.read_text())
        return rows

    def read(self) -> Any:
        """The committed table (``pyarrow.Table``; empty with the right columns when there is none)."""
        import pyarrow.parquet as pq

        if not self.table_path.is_file():
            return _to_table([])
        return pq.read_table(self.table_path)

    def scored_pairs(self) -> set[tuple[str, str]]:
        """(model, task) pairs already scored: in the table or finished on disk."""
        table = self.read().select(["model", "task"]).to_pylist()
        pairs = {(r["model"], r["task"]) for r in table}
        return pairs | {(r["model"], r["task"]) for r in self.finished_rows()}

    def commit(self, extra_rows: Iterable[dict[str, Any]] = ()) -> Any:
        """Driver side: fold finished tasks (and ``extra_rows``) into ``results.parquet``, atomically.

        A (model, task, metric) already in the table is kept as it is. Returns the new table.
        """
        import pyarrow.parquet as pq

        existing = self.read().to_pylist()
        keys = {(r["model"], r["task"], r["metric"]) for r in existing}
        added = []
        for row in [*self.finished_rows(), *extra_rows]:
            key = (row["model"], row["task"], row["metric"])
            if key not in keys:
                keys.add(key)
                added.append(row)
        if not added and self.table_path.is_file():
            return _to_table(existing)
        table = _to_table(existing + added)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.table_path.with_name(f".results.{os.getpid()}.parquet.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.table_path)
        logger.info("results: %d new rows, %d in %s", len(added), table.num_rows, self.table_path)
        return table


def result_row(entry: ModelEntry, *, task: str, capability: str, metric: str, value: float, samples: int,
               settings: dict[str, Any], seconds: float) -> dict[str, Any]:  # fmt: skip
    """One row of the results table (``RESULT_COLUMNS``); ``settings`` is stored as JSON text."""
    return {
        "model": entry.name,
        "role": entry.role,
        "recipe_id": entry.recipe_id,
        "task": task,
        "capability": capability,
        "metric": metric,
        "value": float(value),
        "samples": int(samples),
        "settings": json.dumps(settings, sort_keys=True, default=str),
        "seconds": round(float(seconds), 3),
        "evaluator_version": evaluator_version(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _to_table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    schema = pa.schema(
        [
            ("model", pa.string()),
            ("role", pa.string()),
            ("recipe_id", pa.string()),
            ("task", pa.string()),
            ("capability", pa.string()),
            ("metric", pa.string()),
            ("value", pa.float64()),
            ("samples", pa.int64()),
            ("settings", pa.string()),
            ("seconds", pa.float64()),
            ("evaluator_version", pa.string()),
            ("timestamp", pa.string()),
        ]
    )
    return pa.Table.from_pylist([{c: r.get(c) for c in RESULT_COLUMNS} for r in rows], schema=schema)
