"""The benchmark's two properties, checked on an evaluation's per-sample predictions with paired standard errors.

A miniature of the paper's benchmark must behave like it (issue 8):

1. every expert beats the base on its own task, and
2. a good merge beats every single expert on the average over the tasks,

each by more than the noise. The noise of a difference between two models scored on the same items is the
standard error of the *paired* difference: for per-item scores ``a_i`` and ``b_i`` of one task (n items),
``se = sd(a_i - b_i) / sqrt(n)``; for the average over T tasks (independent items),
``se = sqrt(sum_t se_t^2) / T``. A property "holds" here when the difference exceeds ``MARGIN_SE`` of them.

The input is what the evaluator writes (``predictions/<model>/<task>.jsonl``, one record per item with its
``score``), so the check runs on the real generative evaluation; :class:`score.TaskScores` gives the same
numbers for the teacher-forced scorer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from omnimerge.benchmarks.zoo.score import TaskScores

__all__ = ["MARGIN_SE", "Comparison", "PropertiesCheck", "scores_from_predictions", "check_properties"]

MARGIN_SE = 2.0  # a difference counts when it exceeds this many standard errors of the paired difference


@dataclass(frozen=True)
class Comparison:
    """``better`` minus ``worse`` on one task (or the average when ``task`` is ``None``)."""

    better: str
    worse: str
    task: str | None
    difference: float
    stderr: float

    @property
    def z(self) -> float:
        """The difference in standard errors (``inf`` when two different score sets have no spread)."""
        if self.stderr > 0:
            return self.difference / self.stderr
        return math.inf if self.difference > 0 else (-math.inf if self.difference < 0 else 0.0)

    @property
    def holds(self) -> bool:
        return self.z > MARGIN_SE

    def line(self) -> str:
        what = f"on {self.task}" if self.task else "on the average"
        verdict = "holds" if self.holds else "does NOT hold"
        return (f"{self.better} − {self.worse} {what}: {100 * self.difference:+.1f} points, "
                f"{self.z:+.1f} standard errors ({verdict})")  # fmt: skip


@dataclass(frozen=True)
class PropertiesCheck:
    """Both properties: one comparison per expert on its own task, and the best merge against the best expert."""

    experts_vs_base: tuple[Comparison, ...]
    merge_vs_best_expert: Comparison | None

    @property
    def holds(self) -> bool:
        merge_ok = self.merge_vs_best_expert is not None and self.merge_vs_best_expert.holds
        return merge_ok and all(c.holds for c in self.experts_vs_base)

    def markdown(self) -> str:
        lines = ["## Benchmark properties", "",
                 f"Paired differences on the same items; a property holds above {MARGIN_SE:g} standard errors.", ""]  # fmt: skip
        lines += [f"- expert beats base on its own task: {c.line()}" for c in self.experts_vs_base]
        if self.merge_vs_best_expert is not None:
            lines.append(f"- best merge beats the best expert: {self.merge_vs_best_expert.line()}")
        return "\n".join(lines) + "\n"


def _paired(better: str, worse: str, a: TaskScores, b: TaskScores, task: str | None) -> Comparison:
    if task is not None:
        return Comparison(better, worse, task, a.mean(task) - b.mean(task), a.task_difference_stderr(b, task))
    return Comparison(better, worse, None, a.average() - b.average(), a.difference_stderr(b))


def scores_from_predictions(results_dir: str | Path, model: str, tasks: Sequence[str]) -> TaskScores:
    """Per-item scores of ``model`` from ``results_dir/predictions/<model>/<task>.jsonl``, ordered by question id.

    Raises:
        FileNotFoundError: a (model, task) was not evaluated; the message names the file.
    """
    from omnimerge.engine.evaluation.results import read_predictions

    hits = {}
    for task in tasks:
        path = Path(results_dir) / "predictions" / model / f"{task}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"No predictions of model '{model}' on task '{task}' at {path}; evaluate it first.")
        records = sorted(read_predictions(path), key=lambda r: str(r["question_id"]))
        hits[task] = tuple(float(r["score"]) for r in records)
    return TaskScores(hits)


def check_properties(scores: Mapping[str, TaskScores], *, base: str, experts: Mapping[str, str],
                     merged: Sequence[str]) -> PropertiesCheck:  # fmt: skip
    """Compares experts with the base on their own tasks, and the best merge with the best expert.

    Args:
        scores: per-item scores by model name (all on the same items).
        base: the base model's name.
        experts: expert model name → its own task (experts whose task is not scored are left out).
        merged: names of merged models ("best" = highest average).
    """
    own = [
        _paired(name, base, scores[name], scores[base], task)
        for name, task in experts.items()
        if task in scores[base].hits
    ]
    comparison = None
    if experts and merged:
        best_expert = max(experts, key=lambda n: scores[n].average())
        best_merge = max(merged, key=lambda n: scores[n].average())
        comparison = _paired(best_merge, best_expert, scores[best_merge], scores[best_expert], None)
    return PropertiesCheck(tuple(own), comparison)
