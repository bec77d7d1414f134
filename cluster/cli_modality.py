"""``omnimerge modality`` (merge across modalities toward an omni model) and ``omnimerge omni-assemble``.

``omnimerge modality RECIPE -o OUT`` writes ``OUT/models/<name>/`` (each model's own architecture carrying the
merged LLM) and ``OUT/omni/`` (the bundle). With ``--eval-suite`` each merged model and its unmerged source are
evaluated side by side on that model's own suite (image tasks for the image model, video tasks for the video
model, ...) through :func:`omnimerge.cluster.evaluate.evaluate_model_suites`: one dispatch (Ray by default,
``--executor local`` in-process), one results directory, a report of every model and one per modality.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Mapping

__all__ = ["register", "evaluate_modality", "modality_eval_entries", "ALL_MODELS"]

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``modality`` and ``omni-assemble`` subcommands."""
    p = sub.add_parser(
        "modality",
        help="merge models of several modalities that share one LLM (omni model)",
        description="Merge the shared LLM of the RECIPE's modality models (kind: modality). Writes OUT/models/NAME/ "
        "(each model's own architecture with the merged LLM) and OUT/omni/ (merged LLM once + each model's encoder "
        "and connector + manifest.json).",
    )
    p.add_argument("recipe", help="modality recipe YAML (kind: modality)")
    p.add_argument("-o", "--output", required=False, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT once the new merge is complete")
    p.add_argument("--workers", type=int, default=1, help="threads computing merged LLM shards (default 1)")
    p.add_argument("--device", default="cpu", help="where the merge math runs: cpu (default), cuda")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop (reads headers only)")
    p.add_argument("--eval-suite", action="append", default=[], metavar="[NAME=]SUITE",
                   help="evaluate merged and unmerged models on SUITE (a built-in suite, YAML, or .jsonl/.parquet "
                        "with --metric); NAME=SUITE for one model only (repeatable). A recipe's models.NAME.eval_suite "
                        "counts too")  # fmt: skip
    p.add_argument("--metric", default=None, help="metric of a data-file suite (e.g. vqa_accuracy)")
    p.add_argument("--data-root", default=".", help="folder the suites' relative data paths live under")
    p.add_argument("--eval-results", default=None, help="results folder (default OUTPUT/eval)")
    p.add_argument("--executor", choices=("ray", "local"), default="ray", help="evaluation executor (default ray)")
    p.add_argument("--address", default="local", help="Ray cluster to join for evaluation ('auto', 'ray://...')")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N samples of each task")
    p.add_argument("--skip-missing", action="store_true", help="run the tasks whose data exists, skip the others")
    p.set_defaults(func=_modality)

    p = sub.add_parser(
        "omni-assemble",
        help="rebuild one model's checkpoint from an omni bundle",
        description="Write MODEL's complete checkpoint (byte-for-byte what `omnimerge modality` wrote to "
        "models/MODEL) from BUNDLE (the omni/ folder).",
    )
    p.add_argument("bundle", help="the omni/ folder of a modality merge")
    p.add_argument("model", help="model name (as in the recipe)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_assemble)


def _parse_suites(items: list[str], names: list[str], recipe_suites: Mapping[str, str]) -> dict[str, str]:
    """``NAME=SUITE`` applies to model NAME (over the recipe's ``eval_suite``); a plain ``SUITE`` to every model
    that has no suite otherwise."""
    suites: dict[str, str] = dict(recipe_suites)
    for item in items:
        name, sep, suite = item.partition("=")
        if sep and name in names:
            suites[name] = suite
    for item in items:
        name, sep, _ = item.partition("=")
        if not (sep and name in names):
            for n in names:
                suites.setdefault(n, item)
    return suites


def modality_eval_entries(out_dir: str | Path, model_name: str) -> list[Any]:
    """The merged model and its unmerged source as evaluation entries (``<name>-merged``, ``<name>-source``).

    The source is left out (with a warning) when it is a LoRA adapter: an adapter directory is not a checkpoint
    the evaluator can load.
    """
    from omnimerge.engine.evaluation.results import ModelEntry, model_entry
    from omnimerge.engine.modality_bundle import read_bundle_manifest

    out_dir = Path(out_dir)
    manifest = read_bundle_manifest(out_dir / "omni")
    info = manifest["models"][model_name]
    merged = model_entry(f"{model_name}-merged={out_dir / 'models' / model_name}")
    entries = [merged]
    if info.get("adapter"):
        log.warning("model '%s' is a LoRA adapter on %s; its unmerged form is not a checkpoint, so only the merged "
                    "model is evaluated", model_name, info["source"])
    else:
        entries.append(ModelEntry(f"{model_name}-source", str(info["source"]), "expert"))
    return entries


ALL_MODELS = "*"  # key of the report of every model in evaluate_modality's answer (model names cannot hold '*')


def evaluate_modality(out_dir: str | Path, suites: Mapping[str, Any], *, results_dir: str | Path,
                      data_root: str | Path | None = None, executor: str = "ray", address: str | None = "local",
                      options: Any = None, skip_missing: bool = False) -> dict[str, Path]:
    """Evaluate each merged modality model beside its unmerged source, each on its own modality's suite.

    Every model runs in one dispatch (:func:`omnimerge.cluster.evaluate.evaluate_model_suites`: on a cluster the
    models of all modalities run in parallel) into one results directory. A task that feeds an input a model
    cannot take (a video task given to the image model) is refused before anything is loaded.

    Args:
        out_dir: a modality merge output (``models/`` and ``omni/``).
        suites: model name → suite (a ``Suite``, a built-in name, or a suite file).
        results_dir: ``results.parquet`` and ``predictions/`` of every model; ``report.md`` / ``report.png`` of
            every model (a model has scores in its own suite's columns only); ``<name>/report.md`` / ``.png``
            of one modality's merged and unmerged model.
        data_root: folder the suites' relative data paths live under.
        executor / address / options / skip_missing: as :func:`omnimerge.cluster.evaluate.evaluate_models`.

    Returns:
        model name → its ``report.md``, and ``ALL_MODELS`` (``"*"``) → the report of every model.
    """
    from omnimerge.engine.evaluation.evaluator import EvalOptions
    from omnimerge.engine.evaluation.report import write_report
    from omnimerge.engine.evaluation.suites import Suite, load_suite

    from .evaluate import evaluate_model_suites

    loaded = {name: load_suite(suite) for name, suite in suites.items()}
    entries = {name: modality_eval_entries(out_dir, name) for name in loaded}
    jobs = [(entry, loaded[name]) for name in loaded for entry in entries[name]]
    results = Path(results_dir)
    evaluate_model_suites(jobs, data_root=data_root, results_dir=results, address=address, executor=executor,
                          options=options or EvalOptions(), skip_missing=skip_missing)  # fmt: skip
    tasks = {t.name: t for suite in loaded.values() for t in suite.tasks}
    every = Suite("modality", tuple(tasks.values()))
    md, _ = write_report(results, suite=every, title="Modality models: merged vs unmerged, each on its own tasks",
                         models=[e.name for name in loaded for e in entries[name]])  # fmt: skip
    reports: dict[str, Path] = {ALL_MODELS: md}
    for name, suite in loaded.items():
        reports[name], _ = write_report(results, results / name, suite=suite, models=[e.name for e in entries[name]],
                                        title=f"Modality model '{name}': merged vs unmerged")  # fmt: skip
    return reports


def _modality(args: argparse.Namespace) -> int:
    from omnimerge.engine.errors import RecipeError
    from omnimerge.engine.modality import load_modality_recipe, plan_modality, run_modality_merge

    recipe = load_modality_recipe(args.recipe)
    plan = plan_modality(recipe)
    if args.dry_run:
        print(plan.summary())
        return 0
    if not args.output:
        raise RecipeError("no output directory: give -o OUT (or --dry-run to only print the plan).",
                          path=str(args.recipe))
    report = run_modality_merge(recipe, args.output, overwrite=args.overwrite, workers=args.workers,
                                device=args.device, plan=plan)
    print(report.summary())
    names = [m.name for m in recipe.models]
    suites = _parse_suites(args.eval_suite, names, {m.name: m.eval_suite for m in recipe.models if m.eval_suite})
    if suites:
        from omnimerge.engine.evaluation.evaluator import EvalOptions
        from omnimerge.engine.evaluation.suites import load_suite

        loaded = {n: load_suite(s, metric=args.metric) for n, s in suites.items()}
        options = EvalOptions(batch_size=args.batch_size, max_samples=args.max_samples)
        reports = evaluate_modality(args.output, loaded, results_dir=args.eval_results or Path(args.output) / "eval",
                                    data_root=args.data_root, executor=args.executor, address=args.address,
                                    options=options, skip_missing=args.skip_missing)
        for name, md in reports.items():
            label = "every model" if name == ALL_MODELS else f"'{name}'"
            print(f"report {label}: {md}", file=sys.stderr)
    return 0


def _assemble(args: argparse.Namespace) -> int:
    from omnimerge.engine.modality_bundle import assemble_from_bundle

    out = assemble_from_bundle(args.bundle, args.model, args.output, overwrite=args.overwrite)
    print(out)
    return 0
