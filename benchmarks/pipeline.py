"""Benchmark pipelines: (build the zoo) → merge with every method in one sweep → evaluate base, experts and
merges → paper-style report. ``omnimerge demo`` runs the built-in ``zoo`` bench; ``omnimerge bench NAME`` any.

A bench is data (``benchmarks/benches/NAME.yaml``): a sweep document (base, experts, preset, methods) plus
``evaluation: {suite, data_root}`` and, for the tiny zoo, ``zoo: {family}`` — ``{zoo}`` in paths is the zoo dir.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from omnimerge.engine.errors import RecipeError

__all__ = ["bench_names", "load_bench", "run_bench", "BenchOutcome"]

log = logging.getLogger(__name__)
_SWEEP_KEYS = ("name", "base", "experts", "preset", "rules", "dtype", "shard_size", "seed", "methods")


def bench_names() -> list[str]:
    folder = resources.files("omnimerge.benchmarks") / "benches"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_bench(name_or_path: str | Path) -> dict[str, Any]:
    """A bench document by built-in name (``zoo``, ``paper_qwen2vl_lora``, …) or from a YAML file."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        candidate = resources.files("omnimerge.benchmarks") / "benches" / f"{str(name_or_path).replace('-', '_')}.yaml"
        if not candidate.is_file():
            raise RecipeError(f"no bench named '{name_or_path}' and no such file. Built-in benches: "
                              f"{', '.join(bench_names())}.")
        return yaml.safe_load(candidate.read_text())
    return yaml.safe_load(path.read_text())


def _expand(doc: Any, zoo: str) -> Any:
    if isinstance(doc, str):
        return doc.replace("{zoo}", zoo)
    if isinstance(doc, dict):
        return {k: _expand(v, zoo) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_expand(v, zoo) for v in doc]
    return doc


@dataclass
class BenchOutcome:
    out_dir: Path
    report_md: Path
    report_png: Path
    table: str
    timings: dict[str, float] = field(default_factory=dict)
    failed_runs: list[str] = field(default_factory=list)
    properties: Any = None  # zoo.properties.PropertiesCheck, when the bench's experts are named after its tasks


def run_bench(bench: str | Path | dict[str, Any], out_dir: str | Path, *, zoo_dir: str | Path | None = None,
              zoo_size: str = "full", data_root: str | Path | None = None, executor: str = "ray",
              address: str | None = None, workers: int | None = None, max_samples: int | None = None,
              batch_size: int = 16, say: Callable[[str], None] = print) -> BenchOutcome:
    """Run a bench end to end; resumable (finished merges and scored (model, task) pairs are skipped)."""
    from omnimerge.cluster.evaluate import evaluate_models
    from omnimerge.engine.evaluation import EvalOptions, ModelEntry, write_report
    from omnimerge.engine.execute import LocalExecutor
    from omnimerge.engine.sweep import run_sweep
    from omnimerge.engine.sweep_spec import parse_sweep

    t0 = time.perf_counter()
    doc = copy.deepcopy(bench) if isinstance(bench, dict) else load_bench(bench)
    out_dir = Path(out_dir).expanduser()
    timings: dict[str, float] = {}
    zoo = ""
    if doc.get("zoo"):
        from omnimerge.benchmarks.zoo.build import build_zoo, default_zoo_dir

        family = doc["zoo"].get("family", "full")
        zoo_path = Path(zoo_dir).expanduser() if zoo_dir else default_zoo_dir()
        say(f"[1/4] zoo: {zoo_path} (family {family}, size {zoo_size}; built only where missing)")
        build_zoo(zoo_path, family=family, size=zoo_size, progress=lambda line: say(f"  zoo: {line}"))
        zoo = str(zoo_path)
        timings["zoo"] = time.perf_counter() - t0
    doc = _expand(doc, zoo)
    sweep_doc = {k: doc[k] for k in _SWEEP_KEYS if k in doc}
    sweep_doc.update({"subsets": ["all"], "name_template": "{method}"})
    spec = parse_sweep(sweep_doc)
    evaluation = doc.get("evaluation") or {}
    root = data_root or evaluation.get("data_root")

    t1 = time.perf_counter()
    say(f"[2/4] merging: {len(spec.runs)} runs ({', '.join(r.run_id for r in spec.runs)}) in one sweep")
    merges_dir = out_dir / "merges"

    def merge_and_evaluate(merge_executor: Any, eval_executor: str) -> tuple[Any, Any]:
        report = run_sweep(spec, merges_dir, executor=merge_executor, progress=True)
        say(report.summary())
        timings["merge"] = time.perf_counter() - t1
        models = [ModelEntry("base", str(Path(doc["base"]).expanduser()), role="base")]
        for name, expert in doc["experts"].items():
            source = expert if isinstance(expert, str) else expert["source"]
            models.append(ModelEntry(f"expert-{name}", str(Path(source).expanduser()), role="expert"))
        done = [r for r in report.rows if r["status"] in ("done", "resumed")]
        models += [ModelEntry(r["run_id"], str(r["output"]), role="merged") for r in done]
        t2 = time.perf_counter()
        say(f"[3/4] evaluating {len(models)} models on suite '{evaluation.get('suite')}'")
        last = [0.0]

        def show(p: Any) -> None:
            if time.perf_counter() - last[0] > 5 or p.done == p.total:
                last[0] = time.perf_counter()
                say("  " + p.line())

        evaluate_models(models, evaluation["suite"], data_root=root, results_dir=out_dir / "eval",
                        executor=eval_executor, address=None if eval_executor == "ray" else "local",
                        options=EvalOptions(batch_size=batch_size, max_samples=max_samples), progress=show)
        timings["evaluate"] = time.perf_counter() - t2
        return report, models

    if executor == "ray":
        from omnimerge.cluster.ray_executor import RayExecutor, ray_session

        with ray_session(address) as info:
            sweep_report, models = merge_and_evaluate(RayExecutor(workers=workers, session=info), "ray")
    else:
        sweep_report, models = merge_and_evaluate(LocalExecutor(workers or 1), "local")

    say("[4/4] report")
    md, png = write_report(out_dir / "eval", out_dir, suite=evaluation["suite"],
                           title=f"omnimerge bench '{doc.get('name', 'bench')}'")
    check = _properties(out_dir / "eval", models, evaluation["suite"])
    timings["total"] = time.perf_counter() - t0
    extra = [] if check is None else [check.markdown()]
    extra.append(_timings_markdown(timings))
    md.write_text(md.read_text() + "\n" + "\n".join(extra))
    if check is not None:
        say(check.markdown().rstrip())
    return BenchOutcome(out_dir, md, png, md.read_text(), timings,
                        [r["run_id"] for r in sweep_report.rows if r["status"] == "failed"], check)


def _properties(results_dir: Path, models: list[Any], suite_name: str) -> Any:
    """The benchmark properties (``zoo.properties``) when every expert is named after a task of the suite."""
    from omnimerge.benchmarks.zoo.properties import check_properties, scores_from_predictions
    from omnimerge.engine.evaluation.suites import load_suite

    tasks = [t.name for t in load_suite(suite_name).tasks]
    experts = {m.name: m.name.removeprefix("expert-") for m in models if m.role == "expert"}
    merged = [m.name for m in models if m.role == "merged"]
    base = [m.name for m in models if m.role == "base"]
    if not base or not experts or not set(experts.values()) <= set(tasks):
        return None
    try:
        scores = {m.name: scores_from_predictions(results_dir, m.name, tasks) for m in models}
    except FileNotFoundError as error:
        log.warning("benchmark properties not checked: %s", error)
        return None
    return check_properties(scores, base=base[0], experts=experts, merged=merged)


def _timings_markdown(timings: dict[str, float]) -> str:
    lines = ["## Wall time", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in timings.items()]
    return "\n".join(lines) + "\n"
