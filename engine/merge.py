"""The merge driver: recipe → plan → staging → executor → commit.

``run_merge`` is what ``omnimerge merge`` calls; the executor is pluggable (``LocalExecutor`` here, the Ray
executor in ``omnimerge.cluster``) and all executors run the same :func:`run_shard_job`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from .commit import commit_output, prepare_staging
from .execute import JobContext, LocalExecutor, ProgressFn, ShardResult, choose_device, run_prepasses
from .plan import Plan, ShardJob, plan_merge
from .recipe import Recipe

__all__ = ["Executor", "MergeReport", "run_merge", "make_job_context"]

log = logging.getLogger(__name__)


class Executor(Protocol):
    name: str

    def run(self, jobs: Sequence[ShardJob], ctx: JobContext, progress: ProgressFn | None = None,
            on_result: Callable[[ShardResult], None] | None = None) -> list[ShardResult]: ...


@dataclass
class MergeReport:
    out_dir: Path
    plan: Plan
    results: dict[str, ShardResult]
    timings: dict[str, float]
    resumed: list[str] = field(default_factory=list)  # shards skipped because staging already had them
    executor: str = "local"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_written(self) -> int:
        return sum(r.size for r in self.results.values())

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.results.values() if not r.skipped)

    def summary(self) -> str:
        t = self.timings.get("total", 0.0)
        computed = [r for r in self.results.values() if not r.skipped]
        mb_w = self.bytes_written / 1e6
        lines = [
            f"Merged {len(self.plan.tensors)} tensors into {len(self.results)} shard(s) at {self.out_dir}",
            f"  executor {self.executor}; {len(computed)} shard(s) computed, {len(self.resumed)} resumed from staging",
            f"  read {self.bytes_read / 1e6:.1f} MB, wrote {mb_w:.1f} MB in {t:.1f} s "
            f"({mb_w / t if t else 0:.1f} MB/s written)",
        ]
        per_worker: dict[str, list[ShardResult]] = {}
        for r in computed:
            per_worker.setdefault(r.worker, []).append(r)
        for worker, rs in sorted(per_worker.items()):
            busy = sum(r.seconds for r in rs)
            mb = sum(r.size for r in rs) / 1e6
            lines.append(f"  worker {worker} ({rs[0].device}): {len(rs)} shard(s), {mb:.1f} MB, busy {busy:.1f} s "
                         f"({mb / busy if busy else 0:.1f} MB/s)")
        for key, value in self.extra.items():
            lines.append(f"  {key}: {value}")
        return "\n".join(lines)


def make_job_context(plan: Plan, staging: Path, device: str = "auto", fault: str | None = None) -> JobContext:
    recipe = plan.recipe
    label = str(recipe.path) if recipe.path else (recipe.name or f"recipe {recipe.digest()[:12]}")
    return JobContext(base=plan.base, experts=plan.experts, weights=recipe.weights, seed=recipe.seed,
                      staging=staging, recipe_label=label, device=choose_device(device), fault=fault,
                      plan_digest=plan.digest())


class _Progress:
    """A tqdm bar over output bytes (tensor-level locally, shard-level from remote workers)."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.lock = threading.Lock()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, dynamic_ncols=True)

    def __call__(self, event: str, nbytes: int) -> None:
        if self.bar is None:
            return
        with self.lock:
            if event in ("tensor", "remote-job"):
                self.bar.update(nbytes)

    def skip(self, nbytes: int) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_merge(recipe: Recipe, out_dir: str | Path, *, executor: Executor | None = None, overwrite: bool = False,
              device: str = "auto", progress: bool = True, plan: Plan | None = None,
              fault: str | None = None) -> MergeReport:
    """Merge ``recipe`` into ``out_dir``. Resumes from a matching staging directory; never half-writes."""
    out_dir = Path(out_dir)
    executor = executor or LocalExecutor()
    t0 = time.perf_counter()
    plan = plan or plan_merge(recipe)
    t_plan = time.perf_counter()
    staging = prepare_staging(plan, out_dir, overwrite=overwrite)
    ctx = make_job_context(plan, staging.path, device, fault)
    bar = _Progress(plan.write_bytes, progress, "merging")
    try:
        ctx.model_stats = run_prepasses(plan, ctx)
        t_pre = time.perf_counter()
        results = dict(staging.done)
        for r in staging.done.values():
            bar.skip(r.size)
        todo = [j for j in plan.jobs if j.filename not in results]
        for r in executor.run(todo, ctx, bar):
            results[r.filename] = r
    finally:
        bar.close()
    t_run = time.perf_counter()
    timings = {"plan": t_plan - t0, "prepass": t_pre - t_plan, "shards": t_run - t_pre}
    extra = getattr(executor, "report_extra", lambda: {})()
    out = commit_output(plan, staging, results, out_dir, overwrite=overwrite,
                        timings={**timings, "total": time.perf_counter() - t0},
                        extra_manifest={"executor": executor.name, **({"executor_stats": extra} if extra else {})})
    timings["total"] = time.perf_counter() - t0
    return MergeReport(out, plan, results, timings, resumed=sorted(staging.done), executor=executor.name,
                       extra=extra)
