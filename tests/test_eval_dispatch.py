"""Ray dispatch of 2 models × 2 tasks: a killed worker's model is retried, a rerun recomputes nothing, and the
local executor writes the same predictions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import pytest
from test_evaluator_support import build_model, make_task_data, tiny_suite

from omnimerge.cluster.evaluate import FAULT_ENV, EvalProgress, evaluate_models, plan_evaluation
from omnimerge.engine.errors import EvaluationError
from omnimerge.engine.evaluation.evaluator import EvalOptions
from omnimerge.engine.evaluation.results import ModelEntry, ResultsStore, model_entry

pytestmark = pytest.mark.ray

OPTIONS = EvalOptions(batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fault") / "kill-once"


@pytest.fixture(scope="module")
def ray_instance(fault_file: Path) -> Iterator[None]:
    import ray

    os.environ[FAULT_ENV] = str(fault_file)  # inherited by the workers Ray starts
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2)
    yield
    ray.shutdown()
    os.environ.pop(FAULT_ENV, None)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[ModelEntry]:
    root = tmp_path_factory.mktemp("models")
    base = build_model(root / "base", seed=0)
    merged = build_model(root / "ta_merge", seed=1)
    (merged / "omnimerge_manifest.json").write_text(json.dumps({"recipe_digest": "r-1234", "omnimerge_version": "0"}))
    return [model_entry(f"base={base}", role="base"), model_entry(merged)]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_task_data(tmp_path_factory.mktemp("data"), n=4)


def _snapshot(results: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(results)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted((results / "predictions").rglob("*")) if p.is_file()}  # fmt: skip


@pytest.mark.slow
def test_ray_dispatch_retries_a_killed_worker_then_resumes(
    ray_instance: None, models: list[ModelEntry], data_root: Path, fault_file: Path, tmp_path: Path
) -> None:
    assert [(m.name, m.role, m.recipe_id) for m in models] == [("base", "base", ""), ("ta_merge", "merged", "r-1234")]
    results = tmp_path / "results"
    fault_file.write_text("ta_merge")  # the worker of ta_merge dies after its first task, once
    seen: list[EvalProgress] = []
    table = evaluate_models(models, tiny_suite(), data_root=data_root, results_dir=results, executor="ray",
                            options=OPTIONS, progress=seen.append)  # fmt: skip
    assert not fault_file.exists()  # the fault fired: a worker process died and Ray ran the model again
    rows = sorted((r["model"], r["task"], r["role"], r["recipe_id"], r["samples"]) for r in table.to_pylist())
    assert rows == [
        ("base", "ground", "base", "", 4),
        ("base", "vqa", "base", "", 4),
        ("ta_merge", "ground", "merged", "r-1234", 4),
        ("ta_merge", "vqa", "merged", "r-1234", 4),
    ]
    assert seen and seen[-1].done == seen[-1].total == 4
    assert (results / "results.parquet").is_file()

    # A rerun finds every pair scored: nothing is planned, nothing is rewritten, the table is unchanged.
    before = _snapshot(results)
    assert plan_evaluation(models, tiny_suite(), ResultsStore(results)) == []
    again = evaluate_models(models, tiny_suite(), data_root=data_root, results_dir=results, executor="ray",
                            options=OPTIONS)  # fmt: skip
    assert again.to_pylist() == table.to_pylist()
    assert _snapshot(results) == before

    # The local executor, in-process, writes the same predictions as the Ray workers did.
    local = tmp_path / "local"
    evaluate_models(models, tiny_suite(), data_root=data_root, results_dir=local, executor="local", options=OPTIONS)
    ray_files = {k: v[1] for k, v in before.items() if k.endswith(".jsonl")}
    assert {k: v[1] for k, v in _snapshot(local).items() if k.endswith(".jsonl")} == ray_files
    assert len(ray_files) == 4


def test_new_task_on_rerun_runs_only_that_pair(
    ray_instance: None, models: list[ModelEntry], data_root: Path, tmp_path: Path
) -> None:
    suite = tiny_suite()
    one_task = type(suite)(suite.name, suite.tasks[:1])
    evaluate_models(models[:1], one_task, data_root=data_root, results_dir=tmp_path, executor="ray", options=OPTIONS)
    plan = plan_evaluation(models[:1], suite, ResultsStore(tmp_path))
    assert [(e.name, [t.name for t in tasks]) for e, tasks in plan] == [("base", ["ground"])]
    table = evaluate_models(models[:1], suite, data_root=data_root, results_dir=tmp_path, executor="ray",
                            options=OPTIONS)  # fmt: skip
    assert sorted(table.column("task").to_pylist()) == ["ground", "vqa"]


def test_missing_data_and_bad_arguments_are_refused(models: list[ModelEntry], tmp_path: Path) -> None:
    missing = r"(?s)Suite 'tiny' cannot run: data is missing under .*- task 'vqa': no data at"
    with pytest.raises(EvaluationError, match=missing):
        evaluate_models(models, tiny_suite(), data_root=tmp_path / "nowhere", results_dir=tmp_path, executor="local")
    with pytest.raises(EvaluationError, match="Unknown executor 'threads'; use 'ray' or 'local'."):
        evaluate_models(models, tiny_suite(), results_dir=tmp_path, executor="threads")
    with pytest.raises(EvaluationError, match="Model names must be unique; base repeat. Name them NAME=PATH."):
        evaluate_models([models[0], models[0]], tiny_suite(), results_dir=tmp_path, executor="local")
