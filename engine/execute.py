"""Running ShardJobs: read → task vectors in float32 → method → cast → write, one shard per job.

``run_shard_job`` runs one merge's job: it reads its inputs straight from storage (mmap), writes its shard
under a temporary name in the staging directory, renames it into place and records its size and sha256, so a
rerun can skip it. Only the job spec and a small :class:`ShardResult` cross process boundaries. Its loop is
the one-run case of :func:`~omnimerge.engine.shard_runs.run_slots`, which sweep jobs run for many runs.

:func:`execute_job` is the one function every executor (local threads here, Ray actors in
``omnimerge.cluster``) calls per job: a context that knows how to run its own jobs (a sweep's, with a
``run_job`` method) runs them; a :class:`JobContext` runs ``run_shard_job``.
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from omnimerge.algorithms.registry import get_method

from .errors import NonFiniteError, ResumeError, ShardJobError
from .plan import Plan, ShardJob
from .shard_runs import ProgressFn, RunSlot, SharedInputs, ShardResult, record_path, run_slots
from .sources import ResolvedSource

__all__ = ["JobContext", "ShardResult", "run_shard_job", "execute_job", "LocalExecutor", "run_prepasses", "choose_device",
           "record_path", "ProgressFn"]

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    """Everything a worker needs besides the job: picklable (paths and parsed headers, no open files)."""

    base: ResolvedSource
    experts: list[ResolvedSource]
    weights: list[float]
    seed: int
    staging: Path
    recipe_label: str
    model_stats: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    max_batch_bytes: int = 1 << 30  # inputs of one batched call of a method (same-shape tensors stacked)
    # Fault injection for recovery tests: "<tensor>:<marker file>" makes the process that reaches <tensor>
    # die (os._exit) if the marker does not exist yet, creating it first — so exactly one attempt dies.
    fault: str | None = None
    plan_digest: str = ""  # the plan this context computes for; shards land only in a staging claiming it

    @property
    def expert_ids(self) -> tuple[str, ...]:
        return tuple(f"{e.label}@{e.fingerprint()[:16]}" for e in self.experts)


def choose_device(requested: str = "auto") -> str:
    """``auto`` → ``cuda`` when a GPU is visible to this process, else ``cpu``."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available here; using cpu", requested)
        return "cpu"
    return requested


def run_shard_job(job: ShardJob, ctx: JobContext, progress: ProgressFn | None = None) -> ShardResult:
    """Merge one ShardJob into ``ctx.staging/job.filename`` and record it. Idempotent: a rerun rewrites the
    same bytes under a fresh temporary name, then renames.

    The one-run case of :func:`~omnimerge.engine.shard_runs.run_slots` (the loop a sweep job runs for many).
    """
    slot = RunSlot(run_id=ctx.recipe_label, job=job, experts=tuple(range(len(ctx.experts))),
                   weights=tuple(ctx.weights), expert_ids=ctx.expert_ids, seed=ctx.seed, staging=ctx.staging,
                   label=ctx.recipe_label, model_stats=ctx.model_stats, max_batch_bytes=ctx.max_batch_bytes,
                   plan_digest=ctx.plan_digest)
    (outcome,) = run_slots([slot], ctx.base, ctx.experts, device=ctx.device, progress=progress, fault=ctx.fault)
    if outcome.result is None:
        exc = outcome.error
        if isinstance(exc, (NonFiniteError, ResumeError, ShardJobError)):
            raise exc
        raise ShardJobError(
            f"Shard '{job.filename}' failed at tensor '{outcome.tensor}' (recipe {ctx.recipe_label}): "
            f"{type(exc).__name__}: {exc}") from exc
    if progress:
        progress("job", outcome.result.size)
    return outcome.result


def execute_job(job: Any, ctx: Any, progress: ProgressFn | None = None) -> Any:
    """Run one job of any kind: ``ctx.run_job(job, progress)`` when the context has it (sweep jobs, whose
    result lists every run's shard), else :func:`run_shard_job` (a merge's ShardJob → ShardResult)."""
    runner = getattr(ctx, "run_job", None)
    if runner is not None:
        return runner(job, progress)
    return run_shard_job(job, ctx, progress)


def run_prepasses(plan: Plan, ctx: JobContext, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Compute every model-wide statistic the plan needs (streaming, one tensor and one expert at a time).

    Returns ``model_stats`` for :class:`MergeContext`: ``{stat_key: {expert_id: value}}``. With several
    prepasses of the same statistic (different parameters) the later rule's values are keyed by
    ``(expert_id, params)`` as well.
    """
    stats: dict[str, Any] = {}
    if not plan.prepasses:
        return stats
    inputs = SharedInputs(ctx.base, ctx.experts, ctx.device)
    try:
        for need in plan.prepasses:
            spec = get_method(need.method)
            prepass = spec.prepass(dict(need.params))
            states = [prepass.new_state(dict(need.params)) for _ in ctx.experts]
            for p in range(prepass.passes):
                for name in need.tensors:
                    task = next(t for t in plan.tensors if t.name == name)
                    for i in range(len(ctx.experts)):
                        prepass.update(states[i], p, inputs.delta(task.name, i, lowrank=False))
                    inputs.release(name)
                    if progress:
                        progress("prepass", task.numel * 4)
                for state in states:
                    prepass.end_pass(state, p)
            values = stats.setdefault(prepass.stat_key, {})
            for eid, state in zip(ctx.expert_ids, states):
                values[eid] = prepass.result(state)
                values[(eid, need.params)] = values[eid]
    finally:
        inputs.close()
    return stats


class LocalExecutor:
    """Runs ShardJobs on a thread pool in this process (torch releases the GIL in its kernels)."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, int(workers))

    def run(self, jobs: Sequence[ShardJob], ctx: JobContext, progress: ProgressFn | None = None,
            on_result: Callable[[ShardResult], None] | None = None) -> list[ShardResult]:
        results: list[ShardResult] = []
        if self.workers == 1:
            for job in jobs:
                res = execute_job(job, ctx, progress)
                results.append(res)
                if on_result:
                    on_result(res)
            return results
        with ThreadPoolExecutor(self.workers, thread_name_prefix="omnimerge-shard") as pool:
            pending: set[Future] = set()
            queue = list(jobs)
            while queue or pending:
                while queue and len(pending) < self.workers:
                    pending.add(pool.submit(execute_job, queue.pop(0), ctx, progress))
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    res = fut.result()  # re-raises the job's error (others still finish, then the pool closes)
                    results.append(res)
                    if on_result:
                        on_result(res)
        return results
