"""Evaluation dispatch: many models × many tasks, one worker per model, on Ray or in-process.

Each model is one unit of work (:func:`omnimerge.engine.evaluation.evaluator.evaluate_model`): a worker loads
the model once and runs every pending task of it, recording each task on disk as soon as it is scored. On
Ray, a worker is a task holding one GPU (``num_gpus=1``) when the cluster has GPUs, else one CPU slot; many
models run in parallel. A worker process that dies is retried by Ray (``max_retries``); the retry skips the
tasks its predecessor finished. The driver folds finished tasks into ``results.parquet``, and a rerun skips
the (model, task) pairs already scored.

Each model may have its own suite (:func:`evaluate_model_suites`; a modality merge gives the image model image
tasks, the video model video tasks, ...); they all run in one dispatch into one results directory. Before
anything is loaded, every task's data is checked, and every (model, task) pair whose task feeds an input the
model's ``config.json`` shows it cannot take (video to LLaVA, images to Qwen2-Audio) is refused, all together.

Fault injection for tests: when ``OMNIMERGE_EVAL_FAULT_FILE`` names an existing file whose text is a model
name, the worker of that model deletes the file and kills its own process (``os._exit``) right after
recording its first task -- a real process death, once.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from omnimerge.engine.errors import EvaluationError
from omnimerge.engine.evaluation.data import check_suite_data
from omnimerge.engine.evaluation.evaluator import EvalOptions, evaluate_model
from omnimerge.engine.evaluation.modalities import MODALITY_FIX, modality_problems
from omnimerge.engine.evaluation.results import ModelEntry, ResultsStore, model_entry
from omnimerge.engine.evaluation.suites import Suite, TaskSpec, load_suite

__all__ = ["EvalProgress", "plan_evaluation", "evaluate_models", "evaluate_model_suites", "FAULT_ENV"]

logger = logging.getLogger(__name__)

FAULT_ENV = "OMNIMERGE_EVAL_FAULT_FILE"
_BACKENDS = ("builtin", "lmms_eval")


@dataclass(frozen=True)
class EvalProgress:
    """Where a dispatch stands: (model, task) pairs done out of those planned, and an ETA in seconds."""

    done: int
    total: int
    models_running: int
    elapsed: float

    @property
    def eta(self) -> float | None:
        """Seconds left at the pace so far (``None`` before the first pair is done)."""
        if self.done == 0:
            return None
        return self.elapsed / self.done * (self.total - self.done)

    def line(self) -> str:
        """``eval: 3/8 (model × task) done, 2 model(s) running, elapsed 0:41, ETA 1:08``."""
        fmt = lambda s: f"{int(s) // 60}:{int(s) % 60:02d}"  # noqa: E731
        eta = "?" if self.eta is None else fmt(self.eta)
        return (f"eval: {self.done}/{self.total} (model × task) done, {self.models_running} model(s) running, "
                f"elapsed {fmt(self.elapsed)}, ETA {eta}")  # fmt: skip


def plan_evaluation(
    models: Sequence[ModelEntry], suite: Suite, store: ResultsStore
) -> list[tuple[ModelEntry, list[TaskSpec]]]:
    """The (model, pending tasks) pairs still to run: tasks already scored in ``store`` are left out."""
    done = store.scored_pairs()
    plan = []
    for entry in models:
        pending = [t for t in suite.tasks if (entry.name, t.name) not in done]
        if pending:
            plan.append((entry, pending))
    return plan


def _run_model(entry: ModelEntry, tasks: list[TaskSpec], data_root: str | None, results_dir: str,
               options: EvalOptions, suite_name: str, backend: str,
               on_task_done: Callable[[str, str], None] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """One model's unit of work, with the chosen backend (runs in a Ray worker or in-process)."""
    if backend == "lmms_eval":
        from omnimerge.engine.evaluation.lmms_backend import evaluate_model_lmms

        return evaluate_model_lmms(entry, tasks, results_dir=results_dir, options=options, suite_name=suite_name)
    return evaluate_model(entry, tasks, data_root=data_root, results_dir=results_dir, options=options,
                          suite_name=suite_name, on_task_done=on_task_done)  # fmt: skip


def _fault_hook(model: str, task: str) -> None:
    fault_file = os.environ.get(FAULT_ENV)
    if not fault_file or not Path(fault_file).is_file():
        return
    if Path(fault_file).read_text().strip() != model:
        return
    try:
        os.remove(fault_file)
    except FileNotFoundError:  # another attempt took it
        return
    logger.warning("fault injection: killing the worker of %s after %s", model, task)
    os._exit(1)


def _ray_worker(entry: ModelEntry, tasks: list[TaskSpec], data_root: str | None, results_dir: str,
                options: EvalOptions, suite_name: str, backend: str) -> list[dict[str, Any]]:  # fmt: skip
    logging.basicConfig(level=logging.INFO)
    return _run_model(entry, tasks, data_root, results_dir, options, suite_name, backend, on_task_done=_fault_hook)


def _count_done(store: ResultsStore, planned: set[tuple[str, str]]) -> int:
    return len(planned & store.scored_pairs())


# One model's unit of work: the model, its pending tasks, and the name of the suite they come from.
_Job = tuple[ModelEntry, list[TaskSpec], str]


def _run_local(plan: list[_Job], data_root: str | None, store: ResultsStore, options: EvalOptions, backend: str,
               report: Callable[[int, int], None]) -> list[str]:  # fmt: skip
    failures = []
    done = 0
    for entry, tasks, suite_name in plan:
        report(done, 1)

        def task_done(model: str, task: str) -> None:
            nonlocal done
            done += 1
            report(done, 1)

        try:
            _run_model(entry, tasks, data_root, str(store.root), options, suite_name, backend, on_task_done=task_done)
        except EvaluationError as error:
            failures.append(f"{entry.name}: {error}")
        store.commit()
    return failures


def _run_ray(plan: list[_Job], data_root: str | None, store: ResultsStore, options: EvalOptions, backend: str,
             address: str | None, max_retries: int, report: Callable[[int, int], None],
             planned: set[tuple[str, str]]) -> list[str]:  # fmt: skip
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        resources = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        remote = ray.remote(_ray_worker).options(max_retries=max_retries, retry_exceptions=False, **resources)
        refs = {
            remote.remote(entry, tasks, data_root, str(store.root), options, suite_name, backend): entry
            for entry, tasks, suite_name in plan
        }
        logger.info("dispatched %d model(s) on Ray (%s per model)", len(refs), "1 GPU" if gpus else "1 CPU")
        failures = []
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=2.0)
            for ref in ready:
                try:
                    ray.get(ref, timeout=60)
                except Exception as error:  # noqa: BLE001 - a worker's failure is reported, the others go on
                    failures.append(f"{refs[ref].name}: {type(error).__name__}: {error}")
            report(_count_done(store, planned), len(pending))
        return failures
    finally:
        if started_here:
            ray.shutdown()


def _runnable(suite: Suite, data_root: str | Path | None, skip_missing: bool) -> Suite:
    """The suite's tasks that have their data; refuses missing data unless ``skip_missing``."""
    missing = check_suite_data(suite, data_root)
    if missing and not skip_missing:
        lines = "\n".join(f"  - {m}" for m in missing)
        raise EvaluationError(
            f"Suite '{suite.name}' cannot run: data is missing under {data_root}:\n{lines}\n"
            "Fix these, or pass skip_missing (--skip-missing) to run the tasks that have their data."
        )
    if not missing:
        return suite
    runnable = [t for t in suite.tasks if not any(m.startswith(f"task '{t.name}'") for m in missing)]
    logger.warning("skipping %d task(s) without data: %s", len(missing), "; ".join(missing))
    return Suite(suite.name, tuple(runnable), suite.description, suite.source)


def evaluate_models(
    models: Sequence[ModelEntry | str | Path],
    suite: Suite | str | Path,
    *,
    data_root: str | Path | None = None,
    results_dir: str | Path,
    address: str | None = "local",
    executor: str = "ray",
    options: EvalOptions = EvalOptions(),
    backend: str = "builtin",
    skip_missing: bool = False,
    max_retries: int = 2,
    progress: Callable[[EvalProgress], None] | None = None,
) -> Any:
    """Evaluate every model on every task of a suite and return the results table.

    Args:
        models: ``ModelEntry`` objects, or ``PATH`` / ``NAME=PATH`` specs (roles read from merge manifests).
        suite: A ``Suite``, a built-in suite name, or a suite file (``suites.load_suite``).
        data_root: Folder the suite's relative data paths live under.
        results_dir: Where ``results.parquet`` and ``predictions/`` go; pairs already there are skipped.
        address: Ray address: ``local`` starts (and stops) a fresh instance, ``auto`` or ``ray://...`` joins a
            cluster; ignored when Ray is already initialised in this process (that instance is used).
        executor: ``ray`` (one worker per model, in parallel) or ``local`` (in-process, one model at a time).
        options: Batch size, device, dtype, sample limit.
        backend: ``builtin`` (the transformers evaluator) or ``lmms_eval`` (hands models to lmms-eval).
        skip_missing: Run the tasks whose data is on disk and skip the others (default: refuse, listing them).
        max_retries: Ray retries of a model whose worker process died.
        progress: Called with an ``EvalProgress`` after each finished (model, task) and while waiting.

    Returns:
        The whole ``results.parquet`` table (``pyarrow.Table``), old rows included.

    Raises:
        EvaluationError: Missing data (without ``skip_missing``), a task feeding an input a model cannot take, an
            unknown executor or backend, or models that failed (after the others finished and were recorded).
    """
    suite = load_suite(suite)
    return evaluate_model_suites([(m, suite) for m in models], data_root=data_root, results_dir=results_dir,
                                 address=address, executor=executor, options=options, backend=backend,
                                 skip_missing=skip_missing, max_retries=max_retries, progress=progress)  # fmt: skip


def evaluate_model_suites(
    jobs: Sequence[tuple[ModelEntry | str | Path, Suite | str | Path]],
    *,
    data_root: str | Path | None = None,
    results_dir: str | Path,
    address: str | None = "local",
    executor: str = "ray",
    options: EvalOptions = EvalOptions(),
    backend: str = "builtin",
    skip_missing: bool = False,
    max_retries: int = 2,
    progress: Callable[[EvalProgress], None] | None = None,
) -> Any:
    """Evaluate each model on its own suite, all in one dispatch, into one results directory.

    Args:
        jobs: ``(model, suite)`` pairs; a model is a ``ModelEntry`` or a ``PATH`` / ``NAME=PATH`` spec, a suite a
            ``Suite``, a built-in suite name or a suite file. Model names must be unique.
        data_root, results_dir, address, executor, options, backend, skip_missing, max_retries, progress: as
            :func:`evaluate_models`.

    Returns:
        The whole ``results.parquet`` table (``pyarrow.Table``), old rows included.

    Raises:
        EvaluationError: As :func:`evaluate_models`; modality problems list every (model, task) pair at once.
    """
    if executor not in ("ray", "local"):
        raise EvaluationError(f"Unknown executor '{executor}'; use 'ray' or 'local'.")
    if backend not in _BACKENDS:
        raise EvaluationError(f"Unknown evaluation backend '{backend}'; use one of {', '.join(_BACKENDS)}.")
    entries = [model_entry(m) for m, _ in jobs]
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvaluationError(f"Model names must be unique; {', '.join(duplicates)} repeat. Name them NAME=PATH.")
    loaded: dict[int, Suite] = {}  # one check per suite object, however many models share it
    suites = []
    for _, suite in jobs:
        key = id(suite)
        if key not in loaded:
            loaded[key] = load_suite(suite)
            if backend == "builtin":
                loaded[key] = _runnable(loaded[key], data_root, skip_missing)
        suites.append(loaded[key])
    problems = modality_problems(zip(entries, [s.tasks for s in suites]))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise EvaluationError(f"{len(problems)} (model, task) pair(s) feed an input the model cannot take:\n{lines}\n"
                              f"{MODALITY_FIX}")  # fmt: skip
    store = ResultsStore(results_dir)
    store.commit()  # fold in tasks a crashed run finished
    plan: list[_Job] = [(entry, tasks, suite.name) for entry, suite in zip(entries, suites)
                        for _, tasks in plan_evaluation([entry], suite, store)]  # fmt: skip
    planned = {(e.name, t.name) for e, tasks, _ in plan for t in tasks}
    started = time.perf_counter()

    def report(done: int, running: int) -> None:
        state = EvalProgress(done, len(planned), running, time.perf_counter() - started)
        (progress or (lambda s: logger.info(s.line())))(state)

    if not plan:
        suite_names = ", ".join(dict.fromkeys(s.name for s in suites))
        logger.info("every (model, task) pair of suite(s) %s is already scored in %s", suite_names, store.root)
        return store.read()
    root = None if data_root is None else str(Path(data_root).expanduser())
    if executor == "local":
        failures = _run_local(plan, root, store, options, backend, report)
    else:
        failures = _run_ray(plan, root, store, options, backend, address, max_retries, report, planned)
    table = store.commit()
    if failures:
        lines = "\n".join(f"  - {f}" for f in failures)
        raise EvaluationError(
            f"{len(failures)} model(s) failed; the others are recorded in {store.table_path}:\n{lines}\n"
            "Fix the cause and rerun the same command: finished (model, task) pairs are skipped."
        )
    return table
