"""The optional lmms-eval backend: its results JSON read into our rows, and a clear error when it is absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omnimerge.engine.errors import EvaluationError
from omnimerge.engine.evaluation.evaluator import EvalOptions
from omnimerge.engine.evaluation.lmms_backend import (
    evaluate_model_lmms,
    lmms_command,
    lmms_eval_available,
    parse_lmms_results,
)
from omnimerge.engine.evaluation.results import ModelEntry
from omnimerge.engine.evaluation.suites import load_suite

# The lm-evaluation-harness layout lmms-eval writes (values hand-made): ChartQA in [0, 1], MathVista in percent.
RESULTS = {
    "results": {
        "chartqa": {"alias": "chartqa", "relaxed_overall,none": 0.712, "relaxed_overall_stderr,none": 0.009,
                    "relaxed_human_split,none": 0.6},
        "mathvista_testmini": {"alias": "mathvista_testmini", "gpt_eval_score,none": 43.5,
                               "gpt_eval_score_stderr,none": "N/A"},
    },
    "n-samples": {"chartqa": {"original": 2500, "effective": 2500}, "mathvista_testmini": {"original": 1000,
                                                                                           "effective": 1000}},
}  # fmt: skip


def test_parse_lmms_results() -> None:
    suite = load_suite("paper_qwen2vl")
    tasks = [suite.task("chartqa"), suite.task("mathvista_testmini_geometry")]
    entry = ModelEntry("ta", "/m/ta", "merged", "r1")
    rows = parse_lmms_results(RESULTS, entry, tasks, {"backend": "lmms_eval"}, seconds=12.0)
    assert [(r["task"], r["metric"], r["value"], r["samples"], r["capability"]) for r in rows] == [
        ("chartqa", "lmms_eval:relaxed_overall", 0.712, 2500, "Chart"),
        ("mathvista_testmini_geometry", "lmms_eval:gpt_eval_score", 0.435, 1000, "Geometry"),
    ]
    assert json.loads(rows[0]["settings"]) == {"backend": "lmms_eval", "lmms_eval_task": "chartqa"}
    with pytest.raises(EvaluationError, match="lmms-eval results hold no numeric score for task 'textvqa_val'"):
        parse_lmms_results(RESULTS, entry, [suite.task("textvqa_val")], {}, seconds=1.0)


def test_command_line() -> None:
    command = lmms_command("qwen2_vl", "/m/ta", ["chartqa", "gqa"], Path("/out"), batch_size=2, limit=5)
    assert command[1:] == ["-m", "lmms_eval", "--model", "qwen2_vl", "--model_args", "pretrained=/m/ta", "--tasks",
                           "chartqa,gqa", "--batch_size", "2", "--output_path", "/out", "--log_samples",
                           "--limit", "5"]  # fmt: skip


@pytest.mark.skipif(lmms_eval_available(), reason="lmms-eval is installed here")
def test_missing_lmms_eval_is_explained(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="needs the 'lmms-eval' package, which is not installed here"):
        evaluate_model_lmms(ModelEntry("m", str(tmp_path)), load_suite("paper_qwen2vl").tasks,
                            results_dir=tmp_path, options=EvalOptions())  # fmt: skip
