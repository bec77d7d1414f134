"""Evaluation of merged models: metrics, task suites as data, a generative evaluator, results and reports.

The engine side runs in one process and never imports Ray; ``omnimerge.cluster.evaluate`` dispatches
:func:`evaluate_model` over Ray workers. Public names are re-exported here; heavy imports (torch,
transformers, matplotlib) happen inside the functions that need them.
"""

from __future__ import annotations

from .data import Sample, check_suite_data, iter_samples
from .evaluator import EvalOptions, Evaluator, evaluate_model, rescore_predictions
from .loading import load_model_and_processor
from .media import MODALITIES
from .metrics import METRICS, Reference, Scored, get_metric, metric_names
from .report import build_report_table, render_markdown, render_png, write_report
from .results import RESULT_COLUMNS, ModelEntry, ResultsStore, model_entry, read_predictions
from .suites import Suite, TaskSpec, builtin_suites, load_suite, parse_suite
from .synthetic import write_synthetic_tasks

__all__ = [
    "METRICS",
    "MODALITIES",
    "RESULT_COLUMNS",
    "EvalOptions",
    "Evaluator",
    "ModelEntry",
    "Reference",
    "ResultsStore",
    "Sample",
    "Scored",
    "Suite",
    "TaskSpec",
    "build_report_table",
    "builtin_suites",
    "check_suite_data",
    "evaluate_model",
    "get_metric",
    "iter_samples",
    "load_model_and_processor",
    "load_suite",
    "metric_names",
    "model_entry",
    "parse_suite",
    "read_predictions",
    "render_markdown",
    "render_png",
    "rescore_predictions",
    "write_report",
    "write_synthetic_tasks",
]
