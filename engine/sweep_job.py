"""Sweep jobs: "shard i of every run" that shares a shard layout, run through any executor.

A :class:`SweepJob` carries one :class:`~omnimerge.engine.shard_runs.RunSlot` per run (the run's ShardJob,
its experts as indices into the pool, its staging directory); a :class:`SweepContext` carries the base and
the pool. Executors call ``execute_job(job, ctx)``, which calls ``ctx.run_job``: the job reads each input once
and writes every run's shard (:func:`~omnimerge.engine.shard_runs.run_slots`). The result reports each run
on its own — a run that failed loses only its shard.

Memory of one job (:func:`estimate_job_bytes`, an estimate in the spirit of ``ShardJob.peak_bytes``)::

    peak ≈ max over tensors t [ 4·numel_t·(1 + E_t)          shared float32 base + deltas of the E_t pool
                                                             experts the runs merging t use (≤ pool size)
                               + S_t                         memo: per-expert SVDs (≈ 4·(m+n)·min(m,n) each)
                                                             when an SVD method runs, + one T per solver run
                               + W_t                         the largest method workspace (plan's estimate);
                                                             the two largest when t's runs are element-wise
                                                             and go two at a time (RUN_LANES)
                               + I_t+1 ]                     with lanes: the next tensor's shared inputs,
                                                             read while t is merged
         + Σ over batched runs (batch inputs read ahead + outputs held for later members)

so it grows with the pool (E_t), with the number of runs of SVD/solver methods (memo) and with the number
of batched runs (wudi, optmerge) — not with the number of runs of element-wise methods. A tensor every run
streams (engine.row_stream) needs a block's share of this, not the tensor's; the estimate stays the
whole-tensor one (an upper bound).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from .execute import choose_device
from .plan import ShardJob, _expert_bytes, _task_cost
from .shard_runs import RUN_LANES, ProgressFn, RunSlot, ShardResult, _element_wise, plan_batches, run_slots
from .sources import ResolvedSource

__all__ = ["SweepJob", "SweepContext", "SweepJobResult", "RunOutcome", "run_sweep_job", "estimate_job_bytes",
           "job_read_bytes"]

log = logging.getLogger(__name__)

_SVD_METHODS = frozenset({"tsv", "iso_c", "iso_cts", "optmerge"})
_SOLVER_METHODS = frozenset({"wudi", "optmerge"})


@dataclass(frozen=True)
class SweepJob:
    """Shard ``filename`` of every run in ``slots`` (all with the same layout). Picklable.

    ``filename`` is unique within a sweep (``p<pass>/<shard file>``) so executors that key results by it work.
    """

    index: int
    filename: str
    shard: str  # the output shard's file name in each run
    slots: tuple[RunSlot, ...]
    read_bytes: int
    write_bytes: int
    peak_bytes: int
    flops: float

    @property
    def job_id(self) -> str:
        return self.filename

    @property
    def tensors(self) -> tuple:
        return self.slots[0].job.tensors if self.slots else ()

    @property
    def run_ids(self) -> list[str]:
        return [s.run_id for s in self.slots]


@dataclass
class RunOutcome:
    """One run's shard in a sweep job's result: its ShardResult, or why it was lost."""

    run_id: str
    result: ShardResult | None
    error: str = ""
    error_type: str = ""
    tensor: str = ""


@dataclass
class SweepJobResult:
    """What a sweep job reports back (small). ``size`` sums every run's shard; ``bytes_read`` is the job's."""

    filename: str
    outcomes: list[RunOutcome]
    size: int
    bytes_read: int
    seconds: float
    shared_seconds: float
    worker: str = ""
    device: str = "cpu"
    skipped: bool = False


@dataclass
class SweepContext:
    """What every sweep job needs besides itself: the base and the expert pool. Picklable."""

    base: ResolvedSource
    pool: list[ResolvedSource]
    device: str = "auto"  # resolved by each job where it runs
    fault: str | None = None  # as JobContext.fault: "<tensor>:<marker file>" kills the process once
    extra: dict[str, Any] = field(default_factory=dict)

    def run_job(self, job: SweepJob, progress: ProgressFn | None = None) -> SweepJobResult:
        """Called by executors (through ``execute_job``)."""
        return run_sweep_job(job, self, progress)


def run_sweep_job(job: SweepJob, ctx: SweepContext, progress: ProgressFn | None = None) -> SweepJobResult:
    """Write shard ``job.shard`` of every run in the job, reading each input once. Never raises for a run's
    failure: it is reported in that run's outcome."""
    start = time.perf_counter()
    stats: dict[str, Any] = {}
    device = choose_device(ctx.device)  # "auto" resolves where the job runs (a Ray worker may see a GPU)
    try:
        outcomes = run_slots(job.slots, ctx.base, ctx.pool, device=device, progress=progress,
                             fault=ctx.fault, stats=stats)
        outcomes = _retry_out_of_memory_on_cpu(job, ctx, outcomes, device, stats)
        runs = [RunOutcome(o.run_id, o.result, "" if o.ok else str(o.error),
                           "" if o.ok else type(o.error).__name__, o.tensor) for o in outcomes]
    except Exception as exc:  # noqa: BLE001 - the whole job failed: every run in it loses this shard
        log.warning("sweep job %s failed for all its runs: %s", job.filename, exc)
        runs = [RunOutcome(s.run_id, None, str(exc), type(exc).__name__) for s in job.slots]
    size = sum(o.result.size for o in runs if o.result is not None)
    if progress:
        progress("job", size)
    return SweepJobResult(job.filename, runs, size, int(stats.get("bytes_read", 0)), time.perf_counter() - start,
                          float(stats.get("shared_seconds", 0.0)), worker=f"pid{os.getpid()}", device=device)


def _retry_out_of_memory_on_cpu(job: SweepJob, ctx: SweepContext, outcomes: list, device: str,
                                stats: dict[str, Any]) -> list:
    """Runs whose shard ran out of GPU memory are redone on the CPU (as the Ray executor does for merges)."""
    if not device.startswith("cuda"):
        return outcomes
    import torch

    oom = [i for i, o in enumerate(outcomes) if isinstance(o.error, torch.cuda.OutOfMemoryError)]
    if not oom:
        return outcomes
    log.warning("sweep job %s: %d run(s) ran out of GPU memory; redoing them on the CPU", job.filename, len(oom))
    torch.cuda.empty_cache()
    more: dict[str, Any] = {}
    redone = run_slots([job.slots[i] for i in oom], ctx.base, ctx.pool, device="cpu", fault=ctx.fault, stats=more)
    stats["bytes_read"] = stats.get("bytes_read", 0) + more.get("bytes_read", 0)
    outcomes = list(outcomes)
    for i, o in zip(oom, redone):
        outcomes[i] = o
    return outcomes


def job_read_bytes(jobs: Sequence[ShardJob], experts: Sequence[tuple[int, ...]], base: ResolvedSource,
                   pool: Sequence[ResolvedSource]) -> int:
    """Bytes one sweep job reads: every base tensor once, and each pool expert's input of a tensor once if
    any run merges that tensor with that expert."""
    total = 0
    for k, task in enumerate(jobs[0].tensors):
        total += base.index[task.name].nbytes
        used = {i for j, e in zip(jobs, experts) if j.tensors[k].action == "merge" for i in e}
        total += sum(_expert_bytes(pool[i], task.name) for i in used)
    return total


def estimate_job_bytes(jobs: Sequence[ShardJob], experts: Sequence[tuple[int, ...]],
                       max_batch_bytes: int = 1 << 30) -> int:
    """Estimated peak working memory of one sweep job over these runs' shards (see the module docstring).

    For one run without memo this is the plan's own ``ShardJob.peak_bytes``.
    """
    if not jobs:
        return 0
    rows = []  # per tensor: (shared inputs, workspaces + memo, whether its runs go on lanes)
    for k, first in enumerate(jobs[0].tensors):
        merging = [(j.tensors[k], e) for j, e in zip(jobs, experts) if j.tensors[k].action == "merge"]
        used = {i for _, e in merging for i in e}
        numel = first.numel
        if not merging:  # kept at base by every run: the stored tensor and its cast
            rows.append((_task_cost(first, 0)[0], 0, False))
            continue
        shared = 4 * numel * (1 + len(used))
        # the plan's per-tensor cost less the inputs counted as shared: one method's workspace at a time, or
        # RUN_LANES of them when the tensor's runs are element-wise and go side by side
        works = sorted((_task_cost(t, len(e))[0] - 4 * numel * (len(e) + 1) for t, e in merging), reverse=True)
        lanes = len(jobs) > 1 and all(_element_wise(j.tensors[k]) for j in jobs)
        work = sum(works[:RUN_LANES if lanes else 1])
        memo = 0
        if any(t.method in _SVD_METHODS and len(t.shape) == 2 for t, _ in merging):
            m, n = first.shape
            memo += len(used) * 4 * (m + n + 1) * min(m, n)
        memo += 4 * numel * sum(1 for t, _ in merging if t.method in _SOLVER_METHODS and len(t.shape) == 2)
        rows.append((shared, work + memo, lanes))
    peak = 0
    for k, (shared, rest, lanes) in enumerate(rows):
        ahead = rows[k + 1][0] if lanes and k + 1 < len(rows) else 0  # the next tensor's inputs, read meanwhile
        peak = max(peak, shared + rest + ahead)
    batched = 0
    for j, e in zip(jobs, experts):
        batches = plan_batches(j, len(e), max_batch_bytes)
        if batches:
            biggest = max(batches.values(), key=lambda ms: sum(t.numel for t in ms))
            batched += min(max_batch_bytes, sum(t.numel * 4 * (len(e) + 1) for t in biggest))
            batched += sum(t.out_bytes for t in biggest[1:])
    return peak + batched
