"""``omnimerge sweep``: many merges (subsets × methods × grids) in one pass over the layers, then evaluation."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "evaluate_sweep"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="run many merges of one base and an expert pool in one pass (subsets × methods × grids)",
        description="Expand SWEEP (expert subsets × methods × parameter grids) into named runs and merge them all "
                    "in one pass over the layers: every input is read once, task vectors and SVDs are shared. Each "
                    "run lands in OUT/runs/RUN on its own; OUT/results.parquet lists them. Rerun to resume. When the "
                    "sweep names an evaluation suite, the results are evaluated and OUT/leaderboard.md written.")
    p.add_argument("sweep", help="sweep YAML (see docs/sweeps.md)")
    p.add_argument("-o", "--output", required=True, help="sweep output folder (reused on resume)")
    p.add_argument("--dry-run", action="store_true", help="list the runs, passes and costs; read no weights")
    p.add_argument("--json", action="store_true", help="with --dry-run: machine-readable output")
    p.add_argument("--executor", choices=("ray", "local"), default="ray",
                   help="ray (default): Ray actors, a local instance unless --address; local: threads in this "
                        "process")
    p.add_argument("--address", default=None, help="Ray cluster to join: 'auto' or 'ray://host:port'")
    p.add_argument("--workers", type=int, default=None, help="workers (local: threads, default 1; ray: actors)")
    p.add_argument("--device", default="auto", help="auto (cuda when a worker sees a GPU), cpu, cuda")
    p.add_argument("--memory-budget", default=None,
                   help="working memory per job, e.g. 8GB: runs are split into several passes to stay under it "
                        "(default: the sweep file's memory_budget, else one pass)")
    p.add_argument("--overwrite", action="store_true", help="replace run outputs that hold a different merge")
    p.add_argument("--no-eval", action="store_true", help="skip the sweep's evaluation step")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_sweep)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def dry_run_document(sp: Any) -> dict[str, Any]:
    """Runs, passes and costs of a sweep plan, JSON-able."""
    pass_of = {rid: p.index + 1 for p in sp.passes for rid in p.run_ids}
    return {
        "sweep": sp.spec.name,
        "runs": [{"run_id": r.run_id, "method": r.method, "parameters": r.params, "experts": list(r.experts),
                  "subset": r.subset, "pass": pass_of[r.run_id], "shards": len(sp.plans[r.run_id].jobs),
                  "write_bytes": sp.plans[r.run_id].write_bytes, "read_bytes_alone": sp.plans[r.run_id].read_bytes,
                  "flops": sp.plans[r.run_id].flops} for r in sp.runs],
        "passes": [{"pass": p.index + 1, "runs": len(p.run_ids), "peak_bytes": p.peak_bytes,
                    "read_bytes": p.read_bytes} for p in sp.passes],
        "memory_budget": sp.memory_budget,
        "read_bytes": sp.read_bytes,
        "separate_read_bytes": sp.separate_read_bytes,
        "write_bytes": sp.write_bytes,
        "peak_bytes": sp.peak_bytes,
        "evaluation": sp.spec.evaluation,
    }


def render_dry_run(doc: dict[str, Any]) -> str:
    width = max([len(r["run_id"]) for r in doc["runs"]] + [6])
    lines = [f"Sweep '{doc['sweep']}': {len(doc['runs'])} runs", "",
             f"  {'run':<{width}}  {'method':<16} {'experts':<28} pass  shards  {'write':>9}  {'GFLOP':>7}"]
    for r in doc["runs"]:
        experts = "+".join(r["experts"])
        lines.append(f"  {r['run_id']:<{width}}  {r['method']:<16} {experts[:28]:<28} {r['pass']:>4}  "
                     f"{r['shards']:>6}  {_fmt_bytes(r['write_bytes']):>9}  {r['flops'] / 1e9:>7.2f}")
    lines += ["", "Passes over the layers" + (f" (memory budget {_fmt_bytes(doc['memory_budget'])} per job)"
                                              if doc["memory_budget"] else "") + ":"]
    for p in doc["passes"]:
        lines.append(f"  pass {p['pass']}: {p['runs']} runs, reads {_fmt_bytes(p['read_bytes'])}, peak memory per "
                     f"job ≈ {_fmt_bytes(p['peak_bytes'])}")
    ratio = doc["read_bytes"] / doc["separate_read_bytes"] if doc["separate_read_bytes"] else 0.0
    lines += ["", f"Total: read {_fmt_bytes(doc['read_bytes'])} (separate merges: "
                  f"{_fmt_bytes(doc['separate_read_bytes'])}, {ratio:.2f}×), write {_fmt_bytes(doc['write_bytes'])}, "
                  f"peak memory per job ≈ {_fmt_bytes(doc['peak_bytes'])} (+ ~0.5 GB runtime)"]
    if doc["evaluation"]:
        lines.append(f"Then evaluate every run on suite '{doc['evaluation']['suite']}' and write leaderboard.md")
    return "\n".join(lines)


def _sweep(args: argparse.Namespace) -> int:
    from omnimerge.engine.errors import RecipeError
    from omnimerge.engine.recipe import parse_size
    from omnimerge.engine.sweep import plan_sweep, run_sweep
    from omnimerge.engine.sweep_spec import load_sweep

    spec = load_sweep(args.sweep)
    budget = None
    if args.memory_budget:
        try:
            budget = parse_size(args.memory_budget)
        except ValueError as exc:
            raise RecipeError(f"--memory-budget: {exc}") from None
    sp = plan_sweep(spec, memory_budget=budget)
    if args.dry_run:
        doc = dry_run_document(sp)
        print(json.dumps(doc, indent=2, default=str) if args.json else render_dry_run(doc))
        return 0
    fault = os.environ.get("OMNIMERGE_FAULT") or None  # recovery tests, see engine.execute.JobContext.fault
    progress = not args.no_progress
    evaluation = None if args.no_eval else spec.evaluation
    if args.executor == "local":
        from omnimerge.engine.execute import LocalExecutor

        report = run_sweep(sp, args.output, executor=LocalExecutor(args.workers or 1), device=args.device,
                           progress=progress, overwrite=args.overwrite, fault=fault)
        print(report.summary(), file=sys.stderr)
        if evaluation:
            evaluate_sweep(report, evaluation, executor=evaluation.get("executor", "local"), address=args.address)
    else:
        from .ray_executor import RayExecutor, ray_session

        with ray_session(args.address) as info:
            executor = RayExecutor(workers=args.workers, device=args.device, session=info)
            report = run_sweep(sp, args.output, executor=executor, device=args.device, progress=progress,
                               overwrite=args.overwrite, fault=fault)
            print(report.summary(), file=sys.stderr)
            if evaluation:
                evaluate_sweep(report, evaluation, executor=evaluation.get("executor", "ray"), address=args.address)
    return 1 if report.failed else 0


def evaluate_sweep(report: Any, evaluation: dict[str, Any], *, executor: str = "ray",
                   address: str | None = None) -> tuple[Path, Path] | None:
    """Evaluate every committed run of a sweep (and the base with ``include_base``) on the sweep's suite, then
    write ``leaderboard.md`` / ``leaderboard.png`` beside the runs. Returns their paths (None: nothing to do)."""
    from omnimerge.engine.evaluation.evaluator import EvalOptions
    from omnimerge.engine.evaluation.report import write_report
    from omnimerge.engine.evaluation.results import ModelEntry, model_entry

    from .cli_eval import _StderrProgress
    from .evaluate import evaluate_models

    out_dir = Path(report.out_dir)
    entries: list[ModelEntry] = [model_entry(f"{r['run_id']}={r['output']}", role="merged")
                                 for r in report.rows if r["status"] in ("done", "resumed")]
    if not entries:
        print("omnimerge: no run of the sweep succeeded; nothing to evaluate", file=sys.stderr)
        return None
    if evaluation.get("include_base"):
        entries.insert(0, model_entry(f"base={report.plan.base.path}", role="base"))
    root = report.plan.spec.path.parent if report.plan.spec.path else Path.cwd()
    data_root = evaluation.get("data_root")
    if data_root is not None and not Path(data_root).expanduser().is_absolute():
        data_root = str(root / data_root)
    suite = evaluation["suite"]
    if isinstance(suite, str) and (root / suite).is_file():
        suite = str(root / suite)
    options = EvalOptions(batch_size=int(evaluation.get("batch_size", 8)), device=evaluation.get("device"),
                          dtype=evaluation.get("dtype"), max_samples=evaluation.get("max_samples"))
    progress = _StderrProgress()
    try:
        evaluate_models(entries, suite, data_root=data_root, results_dir=out_dir / "eval",
                        address=address or "local", executor=executor, options=options,
                        backend=evaluation.get("backend", "builtin"),
                        skip_missing=bool(evaluation.get("skip_missing", False)), progress=progress)
    finally:
        progress.close()
    md, png = write_report(out_dir / "eval", out_dir / "eval", suite=suite,
                           title=f"Sweep '{report.plan.spec.name}' leaderboard")
    board_md, board_png = out_dir / "leaderboard.md", out_dir / "leaderboard.png"
    os.replace(md, board_md)
    os.replace(png, board_png)
    print(f"leaderboard: {board_md}", file=sys.stderr)
    return board_md, board_png
