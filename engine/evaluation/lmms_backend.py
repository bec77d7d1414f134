"""Optional backend: hand a model and its tasks to ``lmms-eval`` and read its scores into our results table.

Used when a suite's tasks name their lmms-eval task (``lmms_eval_task``) and ``lmms_eval`` is installed. The
model runs in a ``python -m lmms_eval`` subprocess (its own data download and prompts; EVALUATION.md's
toolkits), and the run's results JSON -- the lm-evaluation-harness layout lmms-eval writes, ``{"results":
{task: {"<metric>,<filter>": value, ...}}, "n-samples": {task: {"effective": n}}}`` -- becomes one row per
task. lmms-eval keeps its own per-sample logs (``--log_samples``); their folder is recorded in the settings.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from omnimerge.engine.errors import EvaluationError

from .results import ModelEntry, ResultsStore, result_row
from .suites import TaskSpec

__all__ = [
    "LMMS_MODEL_NAMES",
    "lmms_eval_available",
    "lmms_command",
    "parse_lmms_results",
    "evaluate_model_lmms",
]

logger = logging.getLogger(__name__)

# config.model_type -> lmms-eval's model name.
LMMS_MODEL_NAMES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "internvl": "internvl2",
                    "internvl_chat": "internvl2", "llava": "llava_hf"}  # fmt: skip


def lmms_eval_available() -> bool:
    """Whether ``lmms_eval`` can be imported here."""
    return importlib.util.find_spec("lmms_eval") is not None


def lmms_command(model_name: str, model_path: str, task_names: Sequence[str], output_dir: Path, *,
                 batch_size: int = 1, device: str | None = None, limit: int | None = None) -> list[str]:  # fmt: skip
    """The ``python -m lmms_eval`` command line for one model and its tasks."""
    command = [sys.executable, "-m", "lmms_eval", "--model", model_name, "--model_args", f"pretrained={model_path}",
               "--tasks", ",".join(task_names), "--batch_size", str(batch_size), "--output_path", str(output_dir),
               "--log_samples"]  # fmt: skip
    if device:
        command += ["--device", device]
    if limit is not None:
        command += ["--limit", str(limit)]
    return command


def _headline_metric(task_results: dict[str, Any]) -> tuple[str, float] | None:
    for key, value in task_results.items():
        if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        return key.split(",")[0], float(value)
    return None


def parse_lmms_results(results: dict[str, Any], entry: ModelEntry, tasks: Sequence[TaskSpec],
                       settings: dict[str, Any], seconds: float) -> list[dict[str, Any]]:  # fmt: skip
    """Rows of our table from an lmms-eval results JSON (module docstring for the layout).

    The first numeric metric of each task is its value; values above 1 are percentages and are divided by 100
    (our table keeps [0, 1]). ``metric`` is ``lmms_eval:<their metric name>`` so the two backends never mix.

    Raises:
        EvaluationError: A task is absent from the results or has no numeric metric.
    """
    rows = []
    for task in tasks:
        name = task.lmms_eval_task or task.name
        found = _headline_metric(results.get("results", {}).get(name, {}))
        if found is None:
            raise EvaluationError(
                f"lmms-eval results hold no numeric score for task '{name}' (model '{entry.name}'); "
                f"tasks present: {', '.join(results.get('results', {})) or 'none'}. Check the task name in the suite."
            )
        metric, value = found
        samples = results.get("n-samples", {}).get(name, {}).get("effective", 0)
        rows.append(result_row(entry, task=task.name, capability=task.capability, metric=f"lmms_eval:{metric}",
                               value=value / 100 if value > 1 else value, samples=int(samples),
                               settings={**settings, "lmms_eval_task": name}, seconds=seconds))  # fmt: skip
    return rows


def evaluate_model_lmms(entry: ModelEntry, tasks: Sequence[TaskSpec], *, results_dir: str | Path, options: Any,
                        suite_name: str = "") -> list[dict[str, Any]]:  # fmt: skip
    """Run lmms-eval on one model's pending tasks and record them like the built-in evaluator does.

    Raises:
        EvaluationError: lmms-eval is not installed, the model family is unknown to it, or the run fails.
    """
    if not lmms_eval_available():
        raise EvaluationError(
            "The lmms_eval backend needs the 'lmms-eval' package, which is not installed here; install it "
            "(pip install lmms-eval) or use the built-in evaluator (--backend builtin)."
        )
    store = ResultsStore(results_dir)
    done = store.scored_pairs()
    pending = [t for t in tasks if (entry.name, t.name) not in done]
    if not pending:
        return []
    config = json.loads((Path(entry.path) / "config.json").read_text())
    model_name = LMMS_MODEL_NAMES.get(config.get("model_type", ""))
    if model_name is None:
        raise EvaluationError(
            f"Model '{entry.name}' has model_type '{config.get('model_type')}', which has no lmms-eval model name "
            f"here (known: {', '.join(LMMS_MODEL_NAMES)}); use the built-in evaluator."
        )
    output_dir = store.root / "lmms_eval" / entry.name
    command = lmms_command(model_name, entry.path, [t.lmms_eval_task or t.name for t in pending], output_dir,
                           batch_size=options.batch_size, device=options.device, limit=options.max_samples)  # fmt: skip
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise EvaluationError(
            f"lmms-eval failed on model '{entry.name}' (exit {completed.returncode}): "
            f"{completed.stderr.strip()[-2000:]}\nCommand: {' '.join(command)}"
        )
    candidates = sorted(output_dir.rglob("*results*.json"), key=lambda p: p.stat().st_mtime_ns)
    if not candidates:
        raise EvaluationError(f"lmms-eval finished for '{entry.name}' but wrote no results JSON under {output_dir}.")
    settings = {"backend": "lmms_eval", "command": command, "suite": suite_name, "lmms_eval_output": str(output_dir)}
    rows = parse_lmms_results(json.loads(candidates[-1].read_text()), entry, pending, settings, seconds)
    for row in rows:
        store.record_task(entry.name, row["task"], [row], [])
    return rows
